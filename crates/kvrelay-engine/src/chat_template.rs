//! Chat templates: the Jinja template a Hugging Face checkpoint ships to turn a list of chat
//! messages into one prompt text, found and rendered the way `transformers` does it.
//!
//! Discovery: `chat_template.jinja` in the checkpoint directory wins; otherwise
//! `tokenizer_config.json`'s `chat_template`, a string or a list of `{name, template}` of
//! which the one named `default` is used. `bos_token` and `eos_token` come from
//! `tokenizer_config.json` too. A template that does not compile fails the load, so a server
//! never starts with a chat endpoint that cannot work.

use std::collections::BTreeMap;
use std::path::Path;

use minijinja::syntax::SyntaxConfig;
use minijinja::{Environment, Error, ErrorKind, Value};
use serde_json::Value as Json;

/// The name the template is registered under in its environment.
const TEMPLATE_NAME: &str = "chat_template";

/// Why a chat template cannot be loaded or rendered.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ChatTemplateError {
    /// The checkpoint's template or tokenizer config cannot be read, or holds no usable
    /// template (unparsable JSON, a wrong shape, a template that does not compile).
    #[error("{origin}: {reason}")]
    Invalid { origin: String, reason: String },
    /// The template called `raise_exception(message)`: the messages do not fit it.
    #[error("the chat template refused the messages: {0}")]
    Raised(String),
    /// Rendering failed for another reason (a runtime error in the template).
    #[error("rendering the chat template from {origin} failed: {reason}")]
    Render { origin: String, reason: String },
}

/// One chat message as the template sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// A compiled chat template with the special tokens it may refer to.
pub struct ChatTemplate {
    env: Environment<'static>,
    /// Where the template came from, for error messages.
    origin: String,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("origin", &self.origin)
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish_non_exhaustive()
    }
}

/// The error `raise_exception` carries, found again in the render error's sources.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct RaisedByTemplate(String);

impl ChatTemplate {
    /// The chat template of the checkpoint in `dir`, or `None` when it has none.
    pub fn for_checkpoint(dir: &Path) -> Result<Option<Self>, ChatTemplateError> {
        let config_path = dir.join("tokenizer_config.json");
        let config_origin = config_path.display().to_string();
        let config = match std::fs::read_to_string(&config_path) {
            Ok(text) => match serde_json::from_str::<Json>(&text) {
                Ok(Json::Object(config)) => config,
                Ok(_) => return Err(invalid(&config_origin, "not a JSON object")),
                Err(e) => return Err(invalid(&config_origin, format!("not valid JSON: {e}"))),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => serde_json::Map::new(),
            Err(e) => return Err(invalid(&config_origin, e)),
        };
        let jinja_path = dir.join("chat_template.jinja");
        let (source, origin) = match std::fs::read_to_string(&jinja_path) {
            Ok(source) => (source, jinja_path.display().to_string()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let origin = format!("{config_origin} (chat_template)");
                match config_template(config.get("chat_template"))
                    .map_err(|reason| invalid(&origin, reason))?
                {
                    Some(source) => (source, origin),
                    None => return Ok(None),
                }
            }
            Err(e) => return Err(invalid(&jinja_path.display().to_string(), e)),
        };
        let bos_token = special_token(&config, "bos_token")
            .map_err(|reason| invalid(&config_origin, reason))?;
        let eos_token = special_token(&config, "eos_token")
            .map_err(|reason| invalid(&config_origin, reason))?;
        Self::new(source, origin, bos_token, eos_token).map(Some)
    }

    /// Compiles `source` with Hugging Face's Jinja settings; `origin` names it in errors.
    pub fn new(
        source: String,
        origin: String,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Result<Self, ChatTemplateError> {
        let mut env = Environment::new();
        // transformers compiles chat templates with trim_blocks and lstrip_blocks, so the
        // whitespace around `{% %}` tags renders the same only with them.
        let syntax = SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| invalid(&origin, e))?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned(TEMPLATE_NAME, source)
            .map_err(|e| invalid(&origin, format!("the chat template does not compile: {e}")))?;
        Ok(ChatTemplate {
            env,
            origin,
            bos_token,
            eos_token,
        })
    }

    /// The prompt text for `messages`, ending with the assistant's turn header when
    /// `add_generation_prompt` is set.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, ChatTemplateError> {
        let messages: Vec<Value> = messages
            .iter()
            .map(|m| {
                Value::from(BTreeMap::from([
                    ("role".to_string(), Value::from(m.role.as_str())),
                    ("content".to_string(), Value::from(m.content.as_str())),
                ]))
            })
            .collect();
        let mut context = BTreeMap::from([
            ("messages".to_string(), Value::from(messages)),
            (
                "add_generation_prompt".to_string(),
                Value::from(add_generation_prompt),
            ),
        ]);
        // Absent tokens stay undefined (rendering as ""), as in transformers; a `none` value
        // would render as "none".
        for (name, token) in [
            ("bos_token", &self.bos_token),
            ("eos_token", &self.eos_token),
        ] {
            if let Some(token) = token {
                context.insert(name.to_string(), Value::from(token.as_str()));
            }
        }
        let rendered = self
            .env
            .get_template(TEMPLATE_NAME)
            .and_then(|template| template.render(Value::from(context)));
        rendered.map_err(|e| match raised_message(&e) {
            Some(message) => ChatTemplateError::Raised(message),
            None => ChatTemplateError::Render {
                origin: self.origin.clone(),
                reason: e.to_string(),
            },
        })
    }

    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }

    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }
}

fn invalid(origin: &str, reason: impl std::fmt::Display) -> ChatTemplateError {
    ChatTemplateError::Invalid {
        origin: origin.to_string(),
        reason: reason.to_string(),
    }
}

/// `tokenizer_config.json`'s `chat_template`: a template, or named templates of which
/// `default` is the one used.
fn config_template(value: Option<&Json>) -> Result<Option<String>, String> {
    match value {
        None | Some(Json::Null) => Ok(None),
        Some(Json::String(source)) => Ok(Some(source.clone())),
        Some(Json::Array(named)) => {
            let mut names = Vec::new();
            for entry in named {
                match (entry.get("name"), entry.get("template")) {
                    (Some(Json::String(name)), Some(Json::String(source))) => {
                        if name == "default" {
                            return Ok(Some(source.clone()));
                        }
                        names.push(name.as_str());
                    }
                    _ => {
                        return Err(
                            "a list of chat templates must hold {\"name\": ..., \"template\": ...} objects of strings"
                                .into(),
                        )
                    }
                }
            }
            Err(format!(
                "none of the chat templates {names:?} is named \"default\""
            ))
        }
        Some(_) => Err("must be a string or a list of {\"name\", \"template\"} objects".into()),
    }
}

/// A special token's text: a string, or an added-token object with its `content`.
fn special_token(
    config: &serde_json::Map<String, Json>,
    name: &str,
) -> Result<Option<String>, String> {
    match config.get(name) {
        None | Some(Json::Null) => Ok(None),
        Some(Json::String(text)) => Ok(Some(text.clone())),
        Some(Json::Object(token)) => match token.get("content") {
            Some(Json::String(text)) => Ok(Some(text.clone())),
            _ => Err(format!("`{name}` is an object without a string `content`")),
        },
        Some(_) => Err(format!(
            "`{name}` must be a string or an object with a `content` string"
        )),
    }
}

/// The template's way of refusing its input, e.g. roles that do not alternate.
fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message.clone())
        .with_source(RaisedByTemplate(message)))
}

/// The current local time in the `strftime` format `format` (templates date their system
/// prompt with it).
fn strftime_now(format: String) -> Result<String, Error> {
    jiff::fmt::strtime::format(format.as_str(), &jiff::Zoned::now()).map_err(|e| {
        Error::new(
            ErrorKind::InvalidOperation,
            format!("strftime_now({format:?}): {e}"),
        )
    })
}

/// The message of a `raise_exception` call somewhere in `error`'s sources.
fn raised_message(error: &Error) -> Option<String> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = source {
        if let Some(raised) = e.downcast_ref::<RaisedByTemplate>() {
            return Some(raised.0.clone());
        }
        source = e.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) {
        std::fs::write(dir.join(name), text).unwrap();
    }

    fn user(content: &str) -> Vec<ChatMessage> {
        vec![ChatMessage {
            role: "user".into(),
            content: content.into(),
        }]
    }

    #[test]
    fn a_checkpoint_without_a_template_has_none() {
        let dir = tempfile::tempdir().unwrap();
        assert!(ChatTemplate::for_checkpoint(dir.path()).unwrap().is_none());
        write(
            dir.path(),
            "tokenizer_config.json",
            r#"{"bos_token": "<s>"}"#,
        );
        assert!(ChatTemplate::for_checkpoint(dir.path()).unwrap().is_none());
    }

    #[test]
    fn the_jinja_file_wins_over_tokenizer_config() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "tokenizer_config.json",
            r#"{"chat_template": "config {{ messages[0].content }}", "bos_token": "<s>"}"#,
        );
        write(
            dir.path(),
            "chat_template.jinja",
            "{{ bos_token }}file {{ messages[0].content }}\n",
        );
        let template = ChatTemplate::for_checkpoint(dir.path()).unwrap().unwrap();
        // bos_token still comes from tokenizer_config.json; one trailing newline is dropped
        // as Jinja does.
        assert_eq!(template.render(&user("hi"), true).unwrap(), "<s>file hi");
        std::fs::remove_file(dir.path().join("chat_template.jinja")).unwrap();
        let template = ChatTemplate::for_checkpoint(dir.path()).unwrap().unwrap();
        assert_eq!(template.render(&user("hi"), true).unwrap(), "config hi");
    }

    #[test]
    fn a_template_list_uses_the_default_one() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "tokenizer_config.json",
            r#"{"chat_template": [
                {"name": "tool_use", "template": "tools"},
                {"name": "default", "template": "default {{ messages | length }}"}
            ]}"#,
        );
        let template = ChatTemplate::for_checkpoint(dir.path()).unwrap().unwrap();
        assert_eq!(template.render(&user("hi"), true).unwrap(), "default 1");

        write(
            dir.path(),
            "tokenizer_config.json",
            r#"{"chat_template": [{"name": "tool_use", "template": "tools"}]}"#,
        );
        let err = ChatTemplate::for_checkpoint(dir.path())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("\"default\"") && err.contains("tool_use"),
            "{err}"
        );
    }

    #[test]
    fn special_tokens_may_be_strings_or_added_token_objects() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "tokenizer_config.json",
            r#"{"chat_template": "{{ bos_token }}|{{ eos_token }}|{{ unk_token }}",
                "bos_token": {"__type": "AddedToken", "content": "<|begin_of_text|>", "lstrip": false},
                "eos_token": "<|eot_id|>"}"#,
        );
        let template = ChatTemplate::for_checkpoint(dir.path()).unwrap().unwrap();
        assert_eq!(template.bos_token(), Some("<|begin_of_text|>"));
        assert_eq!(template.eos_token(), Some("<|eot_id|>"));
        // Tokens the config does not name render as nothing.
        assert_eq!(
            template.render(&user("hi"), true).unwrap(),
            "<|begin_of_text|>|<|eot_id|>|"
        );

        write(
            dir.path(),
            "tokenizer_config.json",
            r#"{"chat_template": "x", "bos_token": 7}"#,
        );
        let err = ChatTemplate::for_checkpoint(dir.path())
            .unwrap_err()
            .to_string();
        assert!(err.contains("bos_token"), "{err}");
    }

    #[test]
    fn a_template_that_does_not_compile_fails_the_load() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "chat_template.jinja",
            "{% for m in messages %}{{ m.content }}",
        );
        let err = ChatTemplate::for_checkpoint(dir.path())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("chat_template.jinja") && err.contains("does not compile"),
            "{err}"
        );
        write(dir.path(), "tokenizer_config.json", "{not json");
        let err = ChatTemplate::for_checkpoint(dir.path())
            .unwrap_err()
            .to_string();
        assert!(err.contains("tokenizer_config.json"), "{err}");
    }

    #[test]
    fn rendering_follows_transformers() {
        // Block tags on their own lines leave no whitespace (trim_blocks, lstrip_blocks);
        // Python string methods work; raise_exception reports the template's message.
        let source = "{% for m in messages %}\n    {% if m.role not in ['user', 'assistant'] %}\n        {{ raise_exception('Unknown role ' + m.role) }}\n    {% endif %}\n<{{ m.role }}>{{ m.content.strip() }}\n{% endfor %}\n{% if add_generation_prompt %}<assistant>{% endif %}";
        let template = ChatTemplate::new(source.into(), "test".into(), None, None).unwrap();
        let messages = vec![
            ChatMessage {
                role: "user".into(),
                content: "  hi ".into(),
            },
            ChatMessage {
                role: "assistant".into(),
                content: "hello".into(),
            },
        ];
        assert_eq!(
            template.render(&messages, true).unwrap(),
            "<user>hi\n<assistant>hello\n<assistant>"
        );
        assert_eq!(
            template.render(&messages, false).unwrap(),
            "<user>hi\n<assistant>hello\n"
        );
        let tool = vec![ChatMessage {
            role: "tool".into(),
            content: "x".into(),
        }];
        match template.render(&tool, true) {
            Err(ChatTemplateError::Raised(message)) => assert_eq!(message, "Unknown role tool"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn strftime_now_formats_the_current_date_and_bad_formats_are_errors() {
        let template =
            ChatTemplate::new("{{ strftime_now('%Y') }}".into(), "test".into(), None, None)
                .unwrap();
        let year: i32 = template.render(&[], true).unwrap().parse().unwrap();
        assert!(year >= 2024, "{year}");
        let template = ChatTemplate::new(
            "{{ strftime_now('%Y %') }}".into(),
            "test".into(),
            None,
            None,
        )
        .unwrap();
        match template.render(&[], true) {
            Err(ChatTemplateError::Render { reason, .. }) => {
                assert!(reason.contains("strftime_now"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
    }
}
