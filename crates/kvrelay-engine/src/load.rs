//! Loading a model by the name a command line gives it: the embedded test model or a
//! Hugging Face Llama checkpoint directory.

use std::path::Path;

use crate::{ChatTemplate, ChatTemplateError, EngineError, Model, Tokenizer};

/// The embedded test model's name.
pub const TINY_RANDOM: &str = "tiny-random";

/// The model `name` (`tiny-random` or a checkpoint directory) with positions for
/// `max_model_len` tokens, and its tokenizer.
pub fn load_model(name: &str, max_model_len: usize) -> Result<(Model, Tokenizer), EngineError> {
    if name == TINY_RANDOM {
        return Ok((Model::tiny_random(max_model_len), Tokenizer::Bytes));
    }
    let dir = Path::new(name);
    if !dir.is_dir() {
        return Err(EngineError::Model(format!(
            "{name}: not {TINY_RANDOM} and not a checkpoint directory"
        )));
    }
    let model = Model::load(dir, max_model_len)?;
    let tokenizer = Tokenizer::for_checkpoint(dir)?;
    Ok((model, tokenizer))
}

/// The chat template of the model `name`: none for `tiny-random`, else what the checkpoint
/// directory ships (see [`ChatTemplate::for_checkpoint`]).
pub fn load_chat_template(name: &str) -> Result<Option<ChatTemplate>, ChatTemplateError> {
    if name == TINY_RANDOM {
        return Ok(None);
    }
    ChatTemplate::for_checkpoint(Path::new(name))
}
