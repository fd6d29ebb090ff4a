//! The model's hyper-parameters, read from a Hugging Face `config.json`.

use serde::{Deserialize, Serialize};

use crate::EngineError;

/// Llama-3 style RoPE frequency scaling (`rope_scaling` with `rope_type: "llama3"`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RopeScaling {
    #[serde(alias = "type")]
    pub rope_type: String,
    pub factor: f64,
    #[serde(default = "default_low_freq_factor")]
    pub low_freq_factor: f64,
    #[serde(default = "default_high_freq_factor")]
    pub high_freq_factor: f64,
    #[serde(default = "default_original_max_positions")]
    pub original_max_position_embeddings: usize,
}

fn default_low_freq_factor() -> f64 {
    1.0
}
fn default_high_freq_factor() -> f64 {
    4.0
}
fn default_original_max_positions() -> usize {
    8192
}

/// `eos_token_id` is a single id in some checkpoints and a list in others.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            TokenIds::One(id) => vec![*id],
            TokenIds::Many(ids) => ids.clone(),
        }
    }
}

/// The fields of a Llama `config.json` the engine uses.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    #[serde(default)]
    pub rope_scaling: Option<RopeScaling>,
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
    #[serde(default)]
    pub architectures: Vec<String>,
}

fn default_rms_norm_eps() -> f64 {
    1e-6
}
fn default_rope_theta() -> f64 {
    10_000.0
}
fn default_max_positions() -> usize {
    2048
}

impl LlamaConfig {
    /// Parses and checks a `config.json`.
    pub fn from_json(text: &str) -> Result<Self, EngineError> {
        let config: LlamaConfig = serde_json::from_str(text)
            .map_err(|e| EngineError::Model(format!("config.json: {e}")))?;
        config.validate()?;
        Ok(config)
    }

    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Rejects configurations the forward pass cannot run.
    pub fn validate(&self) -> Result<(), EngineError> {
        let bad = |reason: String| Err(EngineError::Model(format!("config.json: {reason}")));
        if let Some(arch) = self.architectures.first() {
            if arch != "LlamaForCausalLM" {
                return bad(format!(
                    "architecture {arch} is not supported; only LlamaForCausalLM is"
                ));
            }
        }
        let dims = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_kv_heads()),
            ("head_dim", self.head_dim()),
        ];
        if let Some((name, _)) = dims.iter().find(|(_, v)| *v == 0) {
            return bad(format!("{name} is 0"));
        }
        if !self.num_attention_heads.is_multiple_of(self.num_kv_heads()) {
            return bad(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads,
                self.num_kv_heads()
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return bad(format!(
                "head_dim {} is odd; RoPE needs pairs",
                self.head_dim()
            ));
        }
        if let Some(scaling) = &self.rope_scaling {
            if !matches!(scaling.rope_type.as_str(), "llama3" | "default") {
                return bad(format!(
                    "rope_scaling type {:?} is not supported (llama3 or default)",
                    scaling.rope_type
                ));
            }
            if scaling.rope_type == "llama3"
                && (scaling.factor <= 0.0 || scaling.high_freq_factor <= scaling.low_freq_factor)
            {
                return bad(format!("rope_scaling {scaling:?} is inconsistent"));
            }
        }
        Ok(())
    }

    /// The embedded test model: a small Llama-3-shaped network (grouped-query attention,
    /// llama3 RoPE scaling, tied embeddings) over a byte-level vocabulary.
    pub fn tiny_random() -> Self {
        LlamaConfig {
            vocab_size: 320,
            hidden_size: 128,
            intermediate_size: 384,
            num_hidden_layers: 4,
            num_attention_heads: 4,
            num_key_value_heads: Some(2),
            head_dim: Some(32),
            rms_norm_eps: 1e-5,
            rope_theta: 500_000.0,
            rope_scaling: Some(RopeScaling {
                rope_type: "llama3".into(),
                factor: 32.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192,
            }),
            max_position_embeddings: 131_072,
            tie_word_embeddings: false,
            bos_token_id: Some(crate::tokenizer::BYTE_BOS),
            eos_token_id: Some(TokenIds::One(crate::tokenizer::BYTE_EOS)),
            architectures: vec!["LlamaForCausalLM".into()],
        }
    }
}
