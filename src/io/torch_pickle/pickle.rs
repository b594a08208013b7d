//! The reading half of `torch_pickle`: an allow-listing pickle interpreter that only
//! *describes* a state dict (storages and tensor views); nothing is imported or called.
use std::collections::HashMap;
use std::rc::Rc;
use tch::Kind;

type R<T> = std::result::Result<T, String>;

/// The storage classes that may appear in a file, with their element kinds.
const STORAGES: [(&str, Kind); 8] = [
    ("FloatStorage", Kind::Float),
    ("HalfStorage", Kind::Half),
    ("BFloat16Storage", Kind::BFloat16),
    ("DoubleStorage", Kind::Double),
    ("LongStorage", Kind::Int64),
    ("IntStorage", Kind::Int),
    ("BoolStorage", Kind::Bool),
    ("ByteStorage", Kind::Uint8),
];

/// The `torch.<Name>Storage` class for `kind`, if the format supports it.
pub(super) fn storage_class(kind: Kind) -> Option<&'static str> {
    STORAGES.iter().find(|(_, k)| *k == kind).map(|(n, _)| *n)
}

/// One storage named by a persistent id: the record `data/<key>` holds `numel` elements.
pub(super) struct StorageRef {
    pub key: String,
    pub kind: Kind,
    pub numel: i64,
}

/// A tensor as a strided view of a storage (already bounds-checked against its `numel`).
pub(super) struct TensorRef {
    pub storage: usize,
    pub offset: i64,
    pub size: Vec<i64>,
    pub stride: Vec<i64>,
}

/// What `data.pkl` describes: storages, tensor views, and the dict's `(key, tensor)` entries.
pub(super) struct StateDict {
    pub storages: Vec<StorageRef>,
    pub tensors: Vec<TensorRef>,
    pub entries: Vec<(String, usize)>,
}

#[derive(Clone, Copy, PartialEq)]
enum Global {
    OrderedDict,
    RebuildTensorV2,
    RebuildParameter,
    Storage(Kind),
}

/// A pickle value. Containers live in an arena (`Obj` indices), so values are cheap to copy,
/// cycles are harmless and nothing is dropped recursively.
#[derive(Clone)]
enum Value {
    None,
    Bool,
    /// A float (BINFLOAT): never part of a tensor's description, so its value is not kept.
    Float,
    Int(i64),
    Str(Rc<str>),
    Global(Global),
    Obj(usize),
    Storage(usize),
    Tensor(usize),
}

enum Obj {
    Tuple(Vec<Value>),
    List(Vec<Value>),
    Dict(Vec<(Rc<str>, Value)>, HashMap<Rc<str>, usize>),
}

fn global(module: &str, name: &str) -> R<Global> {
    let g = match (module, name) {
        ("collections", "OrderedDict") => Some(Global::OrderedDict),
        ("torch._utils", "_rebuild_tensor_v2") => Some(Global::RebuildTensorV2),
        ("torch._utils", "_rebuild_parameter") => Some(Global::RebuildParameter),
        ("torch", n) => STORAGES
            .iter()
            .find(|(s, _)| *s == n)
            .map(|(_, k)| Global::Storage(*k)),
        _ => None,
    };
    let short = |s: &str| {
        s.chars()
            .take(80)
            .collect::<String>()
            .escape_debug()
            .to_string()
    };
    g.ok_or_else(|| format!("global {}.{} is not allowed", short(module), short(name)))
}

struct Vm<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    marks: Vec<Vec<Value>>,
    memo: HashMap<u64, Value>,
    objs: Vec<Obj>,
    out: StateDict,
    storage_index: HashMap<String, usize>,
}

/// Interprets `data` (the bytes of `data.pkl`) without executing anything.
pub(super) fn parse(data: &[u8]) -> R<StateDict> {
    let mut vm = Vm {
        data,
        pos: 0,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        objs: Vec::new(),
        out: StateDict {
            storages: Vec::new(),
            tensors: Vec::new(),
            entries: Vec::new(),
        },
        storage_index: HashMap::new(),
    };
    let top = vm.run()?;
    let items = match &top {
        Value::Obj(i) => match vm.objs.get(*i) {
            Some(Obj::Dict(items, _)) => items,
            _ => return Err("top-level object is not a dict".into()),
        },
        _ => return Err("top-level object is not a dict".into()),
    };
    let mut entries = Vec::with_capacity(items.len());
    for (k, v) in items {
        match v {
            Value::Tensor(t) => entries.push((k.to_string(), *t)),
            _ => return Err(format!("value of {k:?} is not a tensor")),
        }
    }
    vm.out.entries = entries;
    Ok(vm.out)
}

impl Vm<'_> {
    fn take(&mut self, n: usize) -> R<&[u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.data.len());
        let end = end.ok_or_else(|| format!("pickle truncated at byte {}", self.pos))?;
        let s = self.data.get(self.pos..end).ok_or("pickle truncated")?;
        self.pos = end;
        Ok(s)
    }
    fn arr<const N: usize>(&mut self) -> R<[u8; N]> {
        self.take(N)?
            .try_into()
            .map_err(|_| "pickle truncated".to_string())
    }
    fn u8(&mut self) -> R<u8> {
        Ok(self.arr::<1>()?[0])
    }
    fn len_u64(&mut self) -> R<usize> {
        usize::try_from(u64::from_le_bytes(self.arr()?)).map_err(|_| "length too large".into())
    }
    fn line(&mut self) -> R<String> {
        let rest = self.data.get(self.pos..).unwrap_or_default();
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or("unterminated GLOBAL")?;
        let s = std::str::from_utf8(self.take(n + 1)?).map_err(|_| "GLOBAL is not UTF-8")?;
        Ok(s.trim_end_matches('\n').to_string())
    }
    fn string(&mut self, n: usize) -> R<Value> {
        let s = std::str::from_utf8(self.take(n)?).map_err(|_| "string is not valid UTF-8")?;
        Ok(Value::Str(s.into()))
    }
    fn pop(&mut self) -> R<Value> {
        self.stack
            .pop()
            .ok_or_else(|| "pickle stack underflow".into())
    }
    fn pop_mark(&mut self) -> R<Vec<Value>> {
        let prev = self.marks.pop().ok_or("MARK missing")?;
        Ok(std::mem::replace(&mut self.stack, prev))
    }
    fn new_obj(&mut self, o: Obj) -> Value {
        self.objs.push(o);
        Value::Obj(self.objs.len() - 1)
    }
    fn tuple(&mut self, n: usize) -> R<()> {
        let at = self
            .stack
            .len()
            .checked_sub(n)
            .ok_or("pickle stack underflow")?;
        let items = self.stack.split_off(at);
        let v = self.new_obj(Obj::Tuple(items));
        self.stack.push(v);
        Ok(())
    }
    fn get_tuple(&self, v: &Value) -> R<&[Value]> {
        match v {
            Value::Obj(i) => match self.objs.get(*i) {
                Some(Obj::Tuple(t)) => Ok(t),
                _ => Err("expected a tuple".into()),
            },
            _ => Err("expected a tuple".into()),
        }
    }
    fn ints(&self, v: &Value) -> R<Vec<i64>> {
        let t = self.get_tuple(v)?;
        t.iter()
            .map(|x| match x {
                Value::Int(i) => Ok(*i),
                _ => Err("expected a tuple of ints".to_string()),
            })
            .collect()
    }
    fn is_empty_dict(&self, v: &Value) -> bool {
        matches!(v, Value::Obj(i) if matches!(self.objs.get(*i), Some(Obj::Dict(d, _)) if d.is_empty()))
    }
    /// Adds `items` to the list or dict on top of the stack.
    fn extend_top(&mut self, items: Vec<Value>, dict: bool) -> R<()> {
        let target = match self.stack.last() {
            Some(Value::Obj(i)) => self.objs.get_mut(*i),
            _ => None,
        };
        match (target, dict) {
            (Some(Obj::List(l)), false) => l.extend(items),
            (Some(Obj::Dict(d, index)), true) => {
                if items.len() % 2 != 0 {
                    return Err("SETITEMS with an odd number of items".into());
                }
                let mut it = items.into_iter();
                while let (Some(k), Some(v)) = (it.next(), it.next()) {
                    let Value::Str(k) = k else {
                        return Err("dict key is not a string".into());
                    };
                    match index.get(&k).and_then(|&j| d.get_mut(j)) {
                        Some(slot) => slot.1 = v,
                        None => {
                            index.insert(k.clone(), d.len());
                            d.push((k, v));
                        }
                    }
                }
            }
            _ => return Err("APPEND/SETITEM target is not a list/dict".into()),
        }
        Ok(())
    }
    fn persistent_load(&mut self, pid: &Value) -> R<Value> {
        let t = self.get_tuple(pid)?;
        let [Value::Str(tag), Value::Global(Global::Storage(kind)), Value::Str(key), Value::Str(_location), Value::Int(numel)] =
            t
        else {
            return Err("unsupported persistent id".into());
        };
        if &**tag != "storage" || *numel < 0 {
            return Err("unsupported persistent id".into());
        }
        let (kind, numel, key) = (*kind, *numel, key.to_string());
        if let Some(&i) = self.storage_index.get(&key) {
            let same = self
                .out
                .storages
                .get(i)
                .is_some_and(|s| s.kind == kind && s.numel == numel);
            if !same {
                return Err(format!(
                    "storage {key:?} is used with different dtypes or sizes"
                ));
            }
            return Ok(Value::Storage(i));
        }
        self.out.storages.push(StorageRef {
            key: key.clone(),
            kind,
            numel,
        });
        self.storage_index.insert(key, self.out.storages.len() - 1);
        Ok(Value::Storage(self.out.storages.len() - 1))
    }
    fn reduce(&mut self, f: Value, args: Value) -> R<Value> {
        let Value::Global(g) = f else {
            return Err("REDUCE of something that is not an allowed global".into());
        };
        let args = self.get_tuple(&args)?.to_vec();
        match (g, args.as_slice()) {
            (Global::OrderedDict, []) => Ok(self.new_obj(Obj::Dict(Vec::new(), HashMap::new()))),
            (
                Global::RebuildTensorV2,
                [Value::Storage(s), Value::Int(off), size, stride, Value::Bool, hooks, meta @ ..],
            ) if meta.len() <= 1 => {
                if !self.is_empty_dict(hooks) {
                    return Err("tensors with backward hooks are not supported".into());
                }
                if !meta
                    .iter()
                    .all(|m| matches!(m, Value::None) || self.is_empty_dict(m))
                {
                    return Err("tensor metadata is not supported".into());
                }
                let (size, stride) = (self.ints(size)?, self.ints(stride)?);
                let numel = self.out.storages.get(*s).map_or(0, |s| s.numel);
                check_view(numel, *off, &size, &stride)?;
                let (storage, offset) = (*s, *off);
                self.out.tensors.push(TensorRef {
                    storage,
                    offset,
                    size,
                    stride,
                });
                Ok(Value::Tensor(self.out.tensors.len() - 1))
            }
            (Global::RebuildParameter, [t @ Value::Tensor(_), Value::Bool, hooks])
                if self.is_empty_dict(hooks) =>
            {
                Ok(t.clone())
            }
            (Global::Storage(_), _) => Err("a storage class cannot be called".into()),
            _ => Err("unsupported arguments to an allowed global".into()),
        }
    }

    /// Executes opcodes until STOP. One `match` over the opcode byte: a flat dispatch table, each
    /// arm a few lines, is the shape of a pickle VM (CPython's `load` loop reads the same way), so
    /// it stays one function rather than being split by opcode group.
    fn run(&mut self) -> R<Value> {
        loop {
            let op = self
                .u8()
                .map_err(|_| "pickle ended without STOP".to_string())?;
            match op {
                0x80 => {
                    let p = self.u8()?;
                    if !(2..=5).contains(&p) {
                        return Err(format!("unsupported pickle protocol {p}"));
                    }
                }
                0x95 => {
                    self.arr::<8>()?; // FRAME: only a read-ahead hint
                }
                b'c' => {
                    let (m, n) = (self.line()?, self.line()?);
                    let g = global(&m, &n)?;
                    self.stack.push(Value::Global(g));
                }
                0x93 => {
                    let (n, m) = (self.pop()?, self.pop()?);
                    let (Value::Str(m), Value::Str(n)) = (m, n) else {
                        return Err("STACK_GLOBAL needs two strings".into());
                    };
                    let g = global(&m, &n)?;
                    self.stack.push(Value::Global(g));
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let v = self.persistent_load(&pid)?;
                    self.stack.push(v);
                }
                b'}' => {
                    let v = self.new_obj(Obj::Dict(Vec::new(), HashMap::new()));
                    self.stack.push(v);
                }
                b']' => {
                    let v = self.new_obj(Obj::List(Vec::new()));
                    self.stack.push(v);
                }
                b')' => self.tuple(0)?,
                0x85..=0x87 => self.tuple(usize::from(op - 0x84))?,
                b't' => {
                    let items = self.pop_mark()?;
                    let v = self.new_obj(Obj::Tuple(items));
                    self.stack.push(v);
                }
                b'(' => self.marks.push(std::mem::take(&mut self.stack)),
                b's' | b'a' => {
                    let n = if op == b's' { 2 } else { 1 };
                    let at = self
                        .stack
                        .len()
                        .checked_sub(n)
                        .ok_or("pickle stack underflow")?;
                    let items = self.stack.split_off(at);
                    self.extend_top(items, op == b's')?;
                }
                b'u' | b'e' => {
                    let items = self.pop_mark()?;
                    self.extend_top(items, op == b'u')?;
                }
                b'X' => {
                    let n = u32::from_le_bytes(self.arr()?) as usize;
                    let v = self.string(n)?;
                    self.stack.push(v);
                }
                0x8c => {
                    let n = usize::from(self.u8()?);
                    let v = self.string(n)?;
                    self.stack.push(v);
                }
                0x8d => {
                    let n = self.len_u64()?;
                    let v = self.string(n)?;
                    self.stack.push(v);
                }
                b'J' => {
                    let v = i32::from_le_bytes(self.arr()?);
                    self.stack.push(Value::Int(v.into()));
                }
                b'G' => {
                    self.arr::<8>()?; // BINFLOAT: an 8-byte big-endian double
                    self.stack.push(Value::Float);
                }
                b'K' => {
                    let v = self.u8()?;
                    self.stack.push(Value::Int(v.into()));
                }
                b'M' => {
                    let v = u16::from_le_bytes(self.arr()?);
                    self.stack.push(Value::Int(v.into()));
                }
                0x8a => {
                    let n = usize::from(self.u8()?);
                    if n > 8 {
                        return Err("integer too large".into());
                    }
                    let b = self.take(n)?;
                    let fill = if b.last().is_some_and(|&x| x >= 0x80) {
                        0xff
                    } else {
                        0
                    };
                    let mut buf = [fill; 8];
                    buf.iter_mut().zip(b).for_each(|(d, s)| *d = *s);
                    self.stack.push(Value::Int(i64::from_le_bytes(buf)));
                }
                0x88 | 0x89 => self.stack.push(Value::Bool), // only requires_grad: ignored
                b'N' => self.stack.push(Value::None),
                b'q' | b'r' | 0x94 => {
                    let key = match op {
                        b'q' => u64::from(self.u8()?),
                        b'r' => u64::from(u32::from_le_bytes(self.arr()?)),
                        _ => self.memo.len() as u64,
                    };
                    let v = self
                        .stack
                        .last()
                        .cloned()
                        .ok_or("memoizing an empty stack")?;
                    self.memo.insert(key, v);
                }
                b'h' | b'j' => {
                    let key = match op {
                        b'h' => u64::from(self.u8()?),
                        _ => u64::from(u32::from_le_bytes(self.arr()?)),
                    };
                    let v = self.memo.get(&key).cloned().ok_or("memo key not found")?;
                    self.stack.push(v);
                }
                b'R' => {
                    let (args, f) = (self.pop()?, self.pop()?);
                    let v = self.reduce(f, args)?;
                    self.stack.push(v);
                }
                b'.' => return self.pop(),
                _ => return Err(format!("pickle opcode 0x{op:02x} is not supported")),
            }
        }
    }
}

/// Checks that the strided view lies inside a storage of `numel` elements.
fn check_view(numel: i64, offset: i64, size: &[i64], stride: &[i64]) -> R<()> {
    if size.len() != stride.len() || size.iter().chain(stride).any(|&x| x < 0) || offset < 0 {
        return Err(format!(
            "invalid tensor view: size {size:?}, stride {stride:?}, offset {offset}"
        ));
    }
    if size.contains(&0) {
        return Ok(());
    }
    let mut last = Some(offset);
    for (&n, &s) in size.iter().zip(stride) {
        last = last.and_then(|l| (n - 1).checked_mul(s).and_then(|x| l.checked_add(x)));
    }
    match last {
        Some(l) if l < numel => Ok(()),
        _ => Err(format!(
            "tensor view (size {size:?}, stride {stride:?}, offset {offset}) is out of bounds of its storage of {numel} elements"
        )),
    }
}
