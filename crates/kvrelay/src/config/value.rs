//! Typed conversion of config values, shared by YAML, JSON and env-var sources.
//!
//! LMCache runs every value, whatever its source, through the key's converter (`int(v)`,
//! `_to_bool(v)`, `_to_int_list(v)`), so a quoted `"256"` in YAML or `7300` for a port list
//! are accepted. The same is done here, but a value that does not convert is an error.

use std::fmt;

use serde::de::{self, Deserialize, Deserializer, EnumAccess, MapAccess, SeqAccess, Visitor};
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

// The range is part of the message: a value past it (`99999999999999999999`, which YAML
// and JSON parsers read as a float) would otherwise look like a type error.
macro_rules! int_value {
    ($($t:ty => $name:literal),*) => {$(
        impl ConfigValue for $t {
            fn expected() -> String {
                format!("{} from {} to {}", $name, <$t>::MIN, <$t>::MAX)
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
    u64 => "an integer",
    usize => "an integer",
    u32 => "an integer",
    u16 => "a port number"
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

/// Parses a YAML document into the JSON value model that every source shares.
pub(crate) fn parse_yaml(text: &str) -> Result<Value, serde_yaml_ng::Error> {
    serde_yaml_ng::from_str::<YamlAsJson>(text).map(|doc| doc.0)
}

/// A YAML value read straight into a JSON value (serde_yaml_ng's own `Value` refuses
/// integers past 64 bits with an unreadable "invalid type ... as u128").
struct YamlAsJson(Value);

impl<'de> Deserialize<'de> for YamlAsJson {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer
            .deserialize_any(YamlAsJsonVisitor)
            .map(YamlAsJson)
    }
}

struct YamlAsJsonVisitor;

impl<'de> Visitor<'de> for YamlAsJsonVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a YAML value")
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }

    fn visit_bool<E>(self, b: bool) -> Result<Value, E> {
        Ok(Value::Bool(b))
    }

    fn visit_i64<E>(self, i: i64) -> Result<Value, E> {
        Ok(Value::from(i))
    }

    fn visit_u64<E>(self, u: u64) -> Result<Value, E> {
        Ok(Value::from(u))
    }

    // No key holds an integer past 64 bits. Kept as its digits, it reaches the key's
    // converter, whose error shows the value as written and the key's range.
    fn visit_i128<E>(self, i: i128) -> Result<Value, E> {
        Ok(Value::String(i.to_string()))
    }

    fn visit_u128<E>(self, u: u128) -> Result<Value, E> {
        Ok(Value::String(u.to_string()))
    }

    // Non-finite floats (`.inf`) have no JSON number form; they become the strings
    // Python's `float()` reads back, and the float converter accepts those.
    fn visit_f64<E>(self, f: f64) -> Result<Value, E> {
        Ok(serde_json::Number::from_f64(f)
            .map(Value::Number)
            .unwrap_or_else(|| Value::String(f.to_string())))
    }

    fn visit_str<E>(self, s: &str) -> Result<Value, E> {
        Ok(Value::String(s.to_string()))
    }

    fn visit_string<E>(self, s: String) -> Result<Value, E> {
        Ok(Value::String(s))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(YamlAsJson(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(YamlAsJson(key)) = map.next_key()? {
            let key = match key {
                Value::String(s) => s,
                Value::Number(n) => n.to_string(),
                Value::Bool(b) => b.to_string(),
                other => {
                    return Err(de::Error::custom(format!(
                        "mapping key {other} is not a scalar"
                    )))
                }
            };
            let YamlAsJson(value) = map.next_value()?;
            if out.contains_key(&key) {
                return Err(de::Error::custom(format!("duplicate key {key:?}")));
            }
            out.insert(key, value);
        }
        Ok(Value::Object(out))
    }

    // serde_yaml_ng hands a value with a custom tag (`!foo x`) over as an enum.
    fn visit_enum<A: EnumAccess<'de>>(self, tagged: A) -> Result<Value, A::Error> {
        let (tag, _): (String, _) = tagged.variant()?;
        Err(de::Error::custom(format!(
            "YAML tag !{tag} is not supported"
        )))
    }
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
        let j = parse_yaml("a: .inf").unwrap();
        assert_eq!(f64::from_raw(Raw::Json(&j["a"])), Some(f64::INFINITY));
    }

    #[test]
    fn yaml_keys_tags_and_wide_integers_convert_or_fail_clearly() {
        let j = parse_yaml("1: a\ntrue: b\nbig: 99999999999999999999\nneg: -99999999999999999999")
            .unwrap();
        assert_eq!(
            j,
            json!({"1": "a", "true": "b", "big": "99999999999999999999", "neg": "-99999999999999999999"})
        );
        for (yaml, message) in [
            ("a: !foo x", "YAML tag !foo is not supported"),
            ("[1]: x", "mapping key [1] is not a scalar"),
            ("a: 1\na: 2", "duplicate key \"a\""),
        ] {
            let err = parse_yaml(yaml).unwrap_err().to_string();
            assert!(err.contains(message), "{yaml}: {err}");
        }
    }
}
