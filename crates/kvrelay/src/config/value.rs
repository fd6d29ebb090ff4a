//! Typed conversion of config values, shared by YAML, JSON and env-var sources.
//!
//! LMCache runs every value, whatever its source, through the key's converter (`int(v)`,
//! `_to_bool(v)`, `_to_int_list(v)`), so a quoted `"256"` in YAML or `7300` for a port list
//! are accepted. The same is done here, but a value that does not convert is an error.

use serde_json::{Map, Value};

/// A value before conversion: structured (YAML/JSON) or the text of an env var.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Raw<'a> {
    Json(&'a Value),
    Text(&'a str),
}

impl Raw<'_> {
    /// The value as a user would recognise it in an error message.
    pub(crate) fn display(&self) -> String {
        match self {
            Raw::Json(v) => v.to_string(),
            Raw::Text(s) => format!("{s:?}"),
        }
    }
}

/// A type a config key can have.
pub(crate) trait ConfigValue: Sized {
    /// How the type is named in "expected …" errors.
    fn expected() -> String;
    /// Converts env-var text (already unquoted).
    fn from_text(s: &str) -> Option<Self>;
    /// Converts a structured value; strings go through [`ConfigValue::from_text`] like
    /// LMCache's converters do.
    fn from_json(v: &Value) -> Option<Self> {
        match v {
            Value::String(s) => Self::from_text(s),
            _ => None,
        }
    }
    fn from_raw(raw: Raw<'_>) -> Option<Self> {
        match raw {
            Raw::Json(v) => Self::from_json(v),
            Raw::Text(s) => Self::from_text(unquote(s)),
        }
    }
}

/// LMCache's `_parse_quoted_string`: env values may be wrapped in one pair of quotes.
fn unquote(s: &str) -> &str {
    let s = s.trim();
    for q in ['"', '\''] {
        if let Some(inner) = s.strip_prefix(q).and_then(|t| t.strip_suffix(q)) {
            return inner;
        }
    }
    s
}

impl ConfigValue for bool {
    fn expected() -> String {
        "a boolean (true/false, 1/0, yes/no, on/off)".into()
    }
    // LMCache's `_to_bool` maps every unrecognised string to False; a typo there silently
    // disables a feature, so only the usual spellings are accepted here.
    fn from_text(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "y" | "on" | "t" => Some(true),
            "false" | "0" | "no" | "n" | "off" | "f" => Some(false),
            _ => None,
        }
    }
    fn from_json(v: &Value) -> Option<Self> {
        match v {
            Value::Bool(b) => Some(*b),
            Value::String(s) => Self::from_text(s),
            _ => None,
        }
    }
}

macro_rules! int_value {
    ($($t:ty => $name:literal),*) => {$(
        impl ConfigValue for $t {
            fn expected() -> String {
                $name.into()
            }
            fn from_text(s: &str) -> Option<Self> {
                s.trim().parse().ok()
            }
            fn from_json(v: &Value) -> Option<Self> {
                match v {
                    Value::Number(n) => n
                        .as_u64()
                        .and_then(|u| Self::try_from(u).ok())
                        .or_else(|| n.as_i64().and_then(|i| Self::try_from(i).ok())),
                    Value::String(s) => Self::from_text(s),
                    _ => None,
                }
            }
        }
    )*};
}

int_value!(
    i64 => "an integer",
    u64 => "a non-negative integer",
    usize => "a non-negative integer",
    u32 => "a non-negative integer",
    u16 => "a port number (0-65535)"
);

impl ConfigValue for f64 {
    fn expected() -> String {
        "a number".into()
    }
    // Rust's parser accepts "inf" and "nan" like Python's float(); NaN is never a useful
    // setting, so it is rejected.
    fn from_text(s: &str) -> Option<Self> {
        s.trim().parse().ok().filter(|f: &f64| !f.is_nan())
    }
    fn from_json(v: &Value) -> Option<Self> {
        match v {
            Value::Number(n) => n.as_f64(),
            Value::String(s) => Self::from_text(s),
            _ => None,
        }
    }
}

impl ConfigValue for String {
    fn expected() -> String {
        "a string".into()
    }
    fn from_text(s: &str) -> Option<Self> {
        Some(s.to_string())
    }
}

/// A config string that must not appear in logs: `Debug` prints `<redacted>`.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretString(String);

impl SecretString {
    pub fn new(secret: impl Into<String>) -> Self {
        SecretString(secret.into())
    }

    /// The secret's bytes, for the code that authenticates with it.
    pub fn expose(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl std::fmt::Debug for SecretString {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl ConfigValue for SecretString {
    fn expected() -> String {
        "a non-empty string".into()
    }
    fn from_text(s: &str) -> Option<Self> {
        (!s.is_empty()).then(|| SecretString(s.to_string()))
    }
}

impl<T: ConfigValue> ConfigValue for Option<T> {
    fn expected() -> String {
        format!("{} or null", T::expected())
    }
    fn from_text(s: &str) -> Option<Self> {
        T::from_text(s).map(Some)
    }
    fn from_json(v: &Value) -> Option<Self> {
        match v {
            Value::Null => Some(None),
            v => T::from_json(v).map(Some),
        }
    }
}

impl<T: ConfigValue> ConfigValue for Vec<T> {
    fn expected() -> String {
        format!("{}, or a list of them", T::expected())
    }
    // LMCache's list converters take CSV ("7300,7301") or JSON ("[7300, 7301]") text.
    fn from_text(s: &str) -> Option<Self> {
        let s = s.trim();
        if s.starts_with('[') {
            return serde_json::from_str::<Value>(s)
                .ok()
                .and_then(|v| Self::from_json(&v));
        }
        if s.is_empty() {
            return Some(Vec::new());
        }
        s.split(',')
            .map(|item| T::from_text(unquote(item)))
            .collect()
    }
    // A scalar becomes a one-element list, as `_to_int_list(7300)` gives `[7300]`.
    fn from_json(v: &Value) -> Option<Self> {
        match v {
            Value::Array(items) => items.iter().map(T::from_json).collect(),
            Value::String(s) => Self::from_text(s),
            v => T::from_json(v).map(|one| vec![one]),
        }
    }
}

impl ConfigValue for Map<String, Value> {
    fn expected() -> String {
        "a mapping".into()
    }
    fn from_text(s: &str) -> Option<Self> {
        match serde_json::from_str(s) {
            Ok(Value::Object(m)) => Some(m),
            _ => None,
        }
    }
    fn from_json(v: &Value) -> Option<Self> {
        match v {
            Value::Object(m) => Some(m.clone()),
            Value::String(s) => Self::from_text(s),
            _ => None,
        }
    }
}

/// Converts parsed YAML to JSON values so that every source shares one value model.
///
/// Non-finite floats (`.inf`) have no JSON number form; they become the strings Python's
/// `float()` reads back, and the float converter accepts those.
pub(crate) fn yaml_to_json(v: serde_yaml_ng::Value) -> Result<Value, String> {
    use serde_yaml_ng::Value as Y;
    Ok(match v {
        Y::Null => Value::Null,
        Y::Bool(b) => Value::Bool(b),
        Y::Number(n) => {
            if let Some(u) = n.as_u64() {
                Value::from(u)
            } else if let Some(i) = n.as_i64() {
                Value::from(i)
            } else {
                let f = n.as_f64().unwrap_or(f64::NAN);
                serde_json::Number::from_f64(f)
                    .map(Value::Number)
                    .unwrap_or_else(|| Value::String(f.to_string()))
            }
        }
        Y::String(s) => Value::String(s),
        Y::Sequence(items) => Value::Array(
            items
                .into_iter()
                .map(yaml_to_json)
                .collect::<Result<_, _>>()?,
        ),
        Y::Mapping(m) => {
            let mut out = Map::new();
            for (k, v) in m {
                let key = match k {
                    Y::String(s) => s,
                    Y::Number(n) => n.to_string(),
                    Y::Bool(b) => b.to_string(),
                    other => return Err(format!("mapping key {other:?} is not a scalar")),
                };
                out.insert(key, yaml_to_json(v)?);
            }
            Value::Object(out)
        }
        Y::Tagged(t) => return Err(format!("YAML tag {} is not supported", t.tag)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn bools_follow_lmcache_spellings_and_reject_the_rest() {
        for t in ["True", "1", "yes", "on"] {
            assert_eq!(bool::from_raw(Raw::Text(t)), Some(true), "{t}");
        }
        for f in ["false", "0", "No", "'off'"] {
            assert_eq!(bool::from_raw(Raw::Text(f)), Some(false), "{f}");
        }
        assert_eq!(bool::from_raw(Raw::Text("ture")), None);
        assert_eq!(bool::from_raw(Raw::Json(&json!(1))), None);
    }

    #[test]
    fn lists_accept_csv_json_and_scalars() {
        let want = Some(vec![7300u16, 7301]);
        assert_eq!(Vec::<u16>::from_raw(Raw::Text("7300, 7301")), want);
        assert_eq!(Vec::<u16>::from_raw(Raw::Text("[7300,7301]")), want);
        assert_eq!(Vec::<u16>::from_raw(Raw::Json(&json!([7300, 7301]))), want);
        assert_eq!(
            Vec::<u16>::from_raw(Raw::Json(&json!(7300))),
            Some(vec![7300])
        );
        assert_eq!(
            Vec::<u16>::from_raw(Raw::Text("\"[7300]\"")),
            Some(vec![7300])
        );
        assert_eq!(Vec::<u16>::from_raw(Raw::Text("7300,x")), None);
        assert_eq!(Vec::<u16>::from_raw(Raw::Json(&json!(70000))), None);
    }

    #[test]
    fn numbers_convert_from_text_and_reject_garbage() {
        assert_eq!(usize::from_raw(Raw::Json(&json!("256"))), Some(256));
        assert_eq!(usize::from_raw(Raw::Json(&json!(-1))), None);
        assert_eq!(usize::from_raw(Raw::Json(&json!(2.5))), None);
        assert_eq!(f64::from_raw(Raw::Json(&json!(2))), Some(2.0));
        assert_eq!(f64::from_raw(Raw::Text("inf")), Some(f64::INFINITY));
        assert_eq!(f64::from_raw(Raw::Text("nan")), None);
    }

    #[test]
    fn yaml_infinity_survives_conversion() {
        let y: serde_yaml_ng::Value = serde_yaml_ng::from_str("a: .inf").unwrap();
        let j = yaml_to_json(y).unwrap();
        assert_eq!(f64::from_raw(Raw::Json(&j["a"])), Some(f64::INFINITY));
    }
}
