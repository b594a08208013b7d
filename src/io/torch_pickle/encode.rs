//! The writing half of `torch_pickle`: the protocol-2 pickle of a state dict, as `torch.save`
//! writes it.

/// One tensor for [`encode`]: the dict key, its storage class and key, and a contiguous shape.
pub(super) struct Entry<'a> {
    pub name: &'a str,
    pub class: &'a str,
    pub key: String,
    pub numel: i64,
    pub size: Vec<i64>,
    pub stride: Vec<i64>,
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.push(b'X');
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_int(out: &mut Vec<u8>, v: i64) {
    if let Ok(b) = u8::try_from(v) {
        out.extend_from_slice(&[b'K', b]);
    } else if let Ok(i) = i32::try_from(v) {
        out.push(b'J');
        out.extend_from_slice(&i.to_le_bytes());
    } else {
        out.extend_from_slice(&[0x8a, 8]);
        out.extend_from_slice(&v.to_le_bytes());
    }
}

fn put_ints(out: &mut Vec<u8>, v: &[i64]) {
    out.push(b'(');
    v.iter().for_each(|&x| put_int(out, x));
    out.push(b't');
}

/// A protocol-2 pickle of `OrderedDict(name -> _rebuild_tensor_v2(storage, 0, size, stride,
/// False, OrderedDict()))`, as `torch.save` writes it.
pub(super) fn encode(entries: &[Entry]) -> Vec<u8> {
    let mut out = b"\x80\x02ccollections\nOrderedDict\nq\x00)R(".to_vec();
    for e in entries {
        put_str(&mut out, e.name);
        out.extend_from_slice(b"ctorch._utils\n_rebuild_tensor_v2\n((");
        put_str(&mut out, "storage");
        out.extend_from_slice(format!("ctorch\n{}\n", e.class).as_bytes());
        put_str(&mut out, &e.key);
        put_str(&mut out, "cpu");
        put_int(&mut out, e.numel);
        out.extend_from_slice(b"tQK\x00");
        put_ints(&mut out, &e.size);
        put_ints(&mut out, &e.stride);
        out.extend_from_slice(b"\x89h\x00)Rt");
        out.push(b'R');
    }
    out.extend_from_slice(b"u.");
    out
}
