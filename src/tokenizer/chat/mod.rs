//! Jinja chat templates rendered with `minijinja` exactly as transformers renders them with jinja2.
//!
//! transformers' environment (`_compile_jinja_template`) is reproduced: `trim_blocks` and
//! `lstrip_blocks` on, no auto-escaping, the trailing newline of the template dropped, Python
//! string/dict methods (`.strip()`, `.items()`, ... via `minijinja-contrib`'s pycompat), a `tojson`
//! filter that is Python's `json.dumps` (not jinja's HTML-safe one), `raise_exception(msg)`,
//! `strftime_now(fmt)`, and the template variables `messages`, `tools` (none), `documents` (none),
//! `add_generation_prompt` plus the named special tokens (`bos_token`, `eos_token`, ...).
//!
//! Python's behaviour that minijinja lacks lives in its own modules: [`pyrepr`] prints values as
//! Python's `str()`, [`pyjson`] is the `tojson` filter, [`strftime`] the `strftime_now` function.
mod pyjson;
mod pyrepr;
mod strftime;

use std::fmt::Write as _;

use minijinja::value::{Value, ValueKind};
use minijinja::{AutoEscape, Environment, ErrorKind};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The values templates see (`minijinja::Value`).
pub use minijinja::Value as TemplateValue;

const TEMPLATE_NAME: &str = "chat_template";

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// `"system"`, `"user"`, `"assistant"`, ...
    pub role: String,
    /// The message text.
    pub content: String,
}

impl Message {
    /// A message with any role.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }

    /// A `system` message.
    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }

    /// A `user` message.
    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }

    /// An `assistant` message.
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new("assistant", content)
    }
}

/// A compiled chat template.
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    source: String,
    env: Environment<'static>,
}

fn template_err(e: &minijinja::Error) -> Error {
    let mut msg = format!("chat template: {e}");
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        let _ = write!(msg, ": {cause}");
        source = cause.source();
    }
    Error::Tokenizer(msg)
}

/// transformers' `{% generation %}...{% endgeneration %}` (its AssistantTracker extension) only
/// marks assistant text for masks; when rendering text it is a plain block. minijinja does not
/// know the tag, so it becomes an always-true `if` with the same whitespace control.
fn rewrite_generation_tags(source: &str) -> String {
    static RE: std::sync::OnceLock<Option<regex::Regex>> = std::sync::OnceLock::new();
    let re = RE.get_or_init(|| {
        regex::Regex::new(r"\{%([-+]?)\s*(generation|endgeneration)\s*([-+]?)%\}").ok()
    });
    match re {
        Some(re) if source.contains("generation") => re
            .replace_all(source, |c: &regex::Captures<'_>| {
                let tag = if &c[2] == "generation" {
                    "if true"
                } else {
                    "endif"
                };
                format!("{{%{} {tag} {}%}}", &c[1], &c[3])
            })
            .into_owned(),
        _ => source.to_owned(),
    }
}

impl ChatTemplate {
    /// Compiles a template; a syntax error is an [`Error::Tokenizer`].
    pub fn new(source: impl Into<String>) -> Result<Self> {
        let source = source.into();
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        env.set_auto_escape_callback(|_| AutoEscape::None);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.set_formatter(pyrepr::py_formatter);
        env.add_filter("tojson", pyjson::tojson);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime::strftime_now);
        env.add_template_owned(TEMPLATE_NAME, rewrite_generation_tags(&source))
            .map_err(|e| template_err(&e))?;
        Ok(ChatTemplate { source, env })
    }

    /// The template text as given.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders `messages` (any serializable maps; [`Message`] for the common case) with
    /// `add_generation_prompt` and the extra variables `vars` (the special tokens, ...; later
    /// entries win). See [`ChatTemplate::render_values`].
    pub fn render<M: Serialize>(
        &self,
        messages: &[M],
        add_generation_prompt: bool,
        vars: &[(&str, serde_json::Value)],
    ) -> Result<String> {
        let messages: Vec<Value> = messages.iter().map(Value::from_serialize).collect();
        let vars: Vec<(&str, Value)> = vars
            .iter()
            .map(|(k, v)| (*k, Value::from_serialize(v)))
            .collect();
        self.render_values(&messages, add_generation_prompt, &vars)
    }

    /// [`ChatTemplate::render`] over template values. Maps built with
    /// `TemplateValue::from_iter(pairs)` keep their key order (as Python dicts do, which matters
    /// for `tojson` and `.items()`), unlike `serde_json` maps, which are sorted.
    ///
    /// Messages are normalised as transformers does: top-level keys whose value is null are
    /// dropped, and a `reasoning_content` / `thinking` / `reasoning` value is copied to `thinking`
    /// and `reasoning_content`. An empty conversation, or a message that is not a map, is an
    /// [`Error::Input`]; template errors (including `raise_exception`) are [`Error::Tokenizer`].
    pub fn render_values(
        &self,
        messages: &[Value],
        add_generation_prompt: bool,
        vars: &[(&str, Value)],
    ) -> Result<String> {
        if messages.is_empty() {
            return Err(Error::Input(
                "cannot apply a chat template to an empty conversation; provide at least one \
                 message"
                    .into(),
            ));
        }
        let messages = messages
            .iter()
            .map(normalize_message)
            .collect::<Result<Vec<_>>>()?;
        let mut ctx: Vec<(Value, Value)> = vars
            .iter()
            .map(|(k, v)| (Value::from(*k), v.clone()))
            .collect();
        ctx.push(("messages".into(), Value::from(messages)));
        ctx.push(("tools".into(), Value::from(())));
        ctx.push(("documents".into(), Value::from(())));
        ctx.push((
            "add_generation_prompt".into(),
            Value::from(add_generation_prompt),
        ));
        let ctx: Value = ctx.into_iter().collect();
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| template_err(&e))?;
        template.render(ctx).map_err(|e| template_err(&e))
    }
}

const REASONING_FIELDS: [&str; 3] = ["reasoning_content", "thinking", "reasoning"];

/// transformers' `_normalize_chat_messages` + `_alias_reasoning_fields` for one message.
fn normalize_message(value: &Value) -> Result<Value> {
    if value.kind() != ValueKind::Map {
        return Err(Error::Input(format!(
            "chat messages must be maps (with \"role\" and \"content\"), got {value}"
        )));
    }
    let iter = value.try_iter().map_err(|e| template_err(&e))?;
    let mut entries: Vec<(Value, Value)> = Vec::new();
    for key in iter {
        let item = value.get_item(&key).map_err(|e| template_err(&e))?;
        if !item.is_none() && !item.is_undefined() {
            entries.push((key, item));
        }
    }
    let reasoning = REASONING_FIELDS.iter().find_map(|field| {
        entries
            .iter()
            .find(|(k, _)| k.as_str() == Some(field))
            .map(|(_, v)| v.clone())
    });
    let Some(reasoning) = reasoning else {
        return Ok(entries.into_iter().collect());
    };
    // {"thinking": r, **message, "reasoning_content": r} (dict order: first insertion wins).
    let mut out: Vec<(Value, Value)> = vec![("thinking".into(), reasoning.clone())];
    for (k, v) in entries
        .into_iter()
        .chain([("reasoning_content".into(), reasoning)])
    {
        match out.iter_mut().find(|(ok, _)| *ok == k) {
            Some(slot) => slot.1 = v,
            None => out.push((k, v)),
        }
    }
    Ok(out.into_iter().collect())
}

/// transformers' `raise_exception(message)`: the template refuses its input.
fn raise_exception(message: String) -> std::result::Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
}

fn filter_err(msg: impl Into<String>) -> minijinja::Error {
    minijinja::Error::new(ErrorKind::InvalidOperation, msg.into())
}

/// How deep printing and `tojson` follow nested values before they refuse (a bound on recursion,
/// as Python's own recursion limit is).
const MAX_DEPTH: usize = 500;

/// Renders `template` over `messages` with a generation prompt; panics on errors (tests only).
#[cfg(test)]
fn test_render(template: &str, messages: &[Message], vars: &[(&str, serde_json::Value)]) -> String {
    let t = match ChatTemplate::new(template) {
        Ok(t) => t,
        Err(e) => panic!("{template:?}: {e}"),
    };
    match t.render(messages, true, vars) {
        Ok(s) => s,
        Err(e) => panic!("{template:?}: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::{test_tokenizer, Tokenizer};

    fn smol() -> &'static Tokenizer {
        test_tokenizer()
    }

    const DEFAULT_SYSTEM: &str =
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, \
                                  trained by Hugging Face<|im_end|>\n";

    /// Expected strings from transformers 5.24.0 (`tests/python/tokenizer_reference.py`):
    ///
    /// ```python
    /// from transformers import AutoTokenizer
    /// tok = AutoTokenizer.from_pretrained(model_dir)   # python -m loratch.default_model
    /// tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
    /// ```
    #[test]
    fn smollm2_chat_template_matches_transformers() {
        let tok = smol();
        let render = |messages: &[Message], gen: bool| match tok.apply_chat_template(messages, gen)
        {
            Ok(s) => s,
            Err(e) => panic!("{messages:?}: {e}"),
        };
        // No system message: the template inserts SmolLM2's default one.
        let q = [Message::user("What is the capital of France?")];
        let body = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n";
        assert_eq!(render(&q, false), format!("{DEFAULT_SYSTEM}{body}"));
        assert_eq!(
            render(&q, true),
            format!("{DEFAULT_SYSTEM}{body}<|im_start|>assistant\n")
        );
        assert_eq!(
            render(&q, true),
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging \
             Face<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n\
             <|im_start|>assistant\n"
        );
        // With a system message (non-ASCII).
        let sys = [
            Message::system("You are a terse assistant. Svara på svenska."),
            Message::user("Vad heter huvudstaden i Sverige? åäö"),
        ];
        let expected =
            "<|im_start|>system\nYou are a terse assistant. Svara på svenska.<|im_end|>\n\
                        <|im_start|>user\nVad heter huvudstaden i Sverige? åäö<|im_end|>\n";
        assert_eq!(render(&sys, false), expected);
        assert_eq!(
            render(&sys, true),
            format!("{expected}<|im_start|>assistant\n")
        );
        // Multi-turn; content whitespace is kept.
        let turns = [
            Message::user("Hi!"),
            Message::assistant("Hello! How can I help?"),
            Message::user("  Tell me a joke.\n"),
        ];
        let expected = format!(
            "{DEFAULT_SYSTEM}<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\nHello! How \
             can I help?<|im_end|>\n<|im_start|>user\n  Tell me a joke.\n<|im_end|>\n"
        );
        assert_eq!(render(&turns, false), expected);
        assert_eq!(
            render(&turns, true),
            format!("{expected}<|im_start|>assistant\n")
        );
        // An empty system message replaces the default one.
        let empty_sys = [Message::system(""), Message::user("🤗")];
        assert_eq!(
            render(&empty_sys, true),
            "<|im_start|>system\n<|im_end|>\n<|im_start|>user\n🤗<|im_end|>\n<|im_start|>assistant\n"
        );
        // The rendered prompt tokenizes to the special-token ids.
        let ids = match tok.encode(&render(&q, true), false) {
            Ok(ids) => ids,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(ids.first(), Some(&1));
        // tok.encode("<|im_start|>assistant\n") == [1, 520, 9531, 198]
        assert_eq!(&ids[ids.len().saturating_sub(4)..], &[1, 520, 9531, 198]);
        // Empty conversations are refused, as in transformers.
        assert!(matches!(
            tok.apply_chat_template(&[], true),
            Err(Error::Input(_))
        ));
    }

    use super::test_render as render;

    #[test]
    fn jinja_environment_matches_transformers() {
        let m = [Message::user("  hi there  ")];
        // trim_blocks / lstrip_blocks, trailing newline dropped, python methods, tokens.
        let t = "{{ bos_token }}\n  {% for m in messages %}\n[{{ m.content.strip() }}|{{ m['role'].upper() }}]\n  {% endfor %}\n{% if add_generation_prompt %}GEN{% endif %}\n";
        let vars = [("bos_token", serde_json::json!("<s>"))];
        assert_eq!(render(t, &m, &vars), "<s>\n[hi there|USER]\nGEN");
        // {% generation %} blocks render their body.
        let t =
            "{% for m in messages %}{% generation %}{{ m.content }}{% endgeneration %}{% endfor %}";
        assert_eq!(render(t, &m, &[]), "  hi there  ");
        // No HTML escaping.
        assert_eq!(render("{{ '<a&b>' }}", &m, &[]), "<a&b>");
        // tools / documents are defined and none (printing is tested in pyrepr).
        assert_eq!(
            render("{{ tools is none }}{{ documents is defined }}", &m, &[]),
            "TrueTrue"
        );
        // namespace() and loop controls.
        let t = "{% set ns = namespace(n=0) %}{% for i in range(5) %}{% if i == 3 %}{% break %}{% endif %}{% set ns.n = ns.n + i %}{% endfor %}{{ ns.n }}";
        assert_eq!(render(t, &m, &[]), "3");
    }

    #[test]
    fn errors_are_typed_not_panics() {
        let m = [Message::user("x")];
        for bad in ["{% for %}", "{{ ", "{% endif %}", "{% generation %}"] {
            assert!(
                matches!(ChatTemplate::new(bad), Err(Error::Tokenizer(_))),
                "{bad:?}"
            );
        }
        let t = match ChatTemplate::new("{{ raise_exception('Only user and assistant roles!') }}") {
            Ok(t) => t,
            Err(e) => panic!("{e}"),
        };
        match t.render(&m, false, &[]) {
            Err(Error::Tokenizer(msg)) => {
                assert!(msg.contains("Only user and assistant roles!"), "{msg}")
            }
            other => panic!("{other:?}"),
        }
        for bad in [
            "{{ messages[0].content.nosuchmethod() }}",
            "{{ messages | tojson(bogus=1) }}",
            "{{ 1 + 'a' }}",
            "{{ undefined_thing.attr }}",
        ] {
            let t = match ChatTemplate::new(bad) {
                Ok(t) => t,
                Err(e) => panic!("{bad:?}: {e}"),
            };
            assert!(
                matches!(t.render(&m, false, &[]), Err(Error::Tokenizer(_))),
                "{bad:?}"
            );
        }
        // Messages must be maps.
        let t = match ChatTemplate::new("{{ messages }}") {
            Ok(t) => t,
            Err(e) => panic!("{e}"),
        };
        assert!(matches!(t.render(&["a"], false, &[]), Err(Error::Input(_))));
    }

    #[test]
    fn messages_are_normalised_like_transformers() {
        let t = match ChatTemplate::new("{{ messages[0] | tojson }}") {
            Ok(t) => t,
            Err(e) => panic!("{e}"),
        };
        #[derive(Serialize)]
        struct M {
            role: &'static str,
            content: Option<&'static str>,
            reasoning: Option<&'static str>,
        }
        let msg = [M {
            role: "assistant",
            content: None,
            reasoning: Some("think"),
        }];
        // {"thinking": r, **{"role": ..., "reasoning": r}, "reasoning_content": r}
        assert_eq!(
            t.render(&msg, false, &[]).ok().as_deref(),
            Some(
                r#"{"thinking": "think", "role": "assistant", "reasoning": "think", "reasoning_content": "think"}"#
            )
        );
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]
        /// Arbitrary template text and messages give Ok or a typed error, never a panic.
        #[test]
        fn arbitrary_templates_never_panic(
            source in "([{}%#()\\[\\]|.,'\"~+*/=!<> -]|if|for|in|endif|endfor|set|messages|m|content|tojson|strip|loop|raise_exception|strftime_now|namespace|\\PC)*",
            content in "\\PC*",
            gen: bool,
        ) {
            if let Ok(t) = ChatTemplate::new(source) {
                let r = t.render(&[Message::user(content)], gen, &[]);
                proptest::prop_assert!(matches!(r, Ok(_) | Err(Error::Tokenizer(_))));
            }
        }
    }
}
