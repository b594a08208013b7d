//! Naming a JSON value's kind in error messages, in the words of the format the user wrote.
use serde_json::Value;

/// Whose words name the kinds: JSON's ("an array", "an object") or TOML's ("a list", "a table"),
/// for JSON built from TOML or from a Python dict (the training config).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Words {
    Json,
    Toml,
}

/// "null", "a boolean", "a number", "a string", then "an array"/"a list" or "an object"/"a table".
pub fn kind_name(v: &Value, words: Words) -> &'static str {
    match (v, words) {
        (Value::Null, _) => "null",
        (Value::Bool(_), _) => "a boolean",
        (Value::Number(_), _) => "a number",
        (Value::String(_), _) => "a string",
        (Value::Array(_), Words::Json) => "an array",
        (Value::Array(_), Words::Toml) => "a list",
        (Value::Object(_), Words::Json) => "an object",
        (Value::Object(_), Words::Toml) => "a table",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_format_uses_its_own_words() {
        let array = serde_json::json!([1]);
        let object = serde_json::json!({"a": 1});
        assert_eq!(kind_name(&array, Words::Json), "an array");
        assert_eq!(kind_name(&array, Words::Toml), "a list");
        assert_eq!(kind_name(&object, Words::Json), "an object");
        assert_eq!(kind_name(&object, Words::Toml), "a table");
        assert_eq!(kind_name(&serde_json::json!(null), Words::Toml), "null");
        assert_eq!(kind_name(&serde_json::json!("x"), Words::Json), "a string");
    }
}
