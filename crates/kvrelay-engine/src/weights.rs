//! Model weights: loaded from Hugging Face safetensors shards, generated for the embedded
//! test model, and written back out as a checkpoint.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use crate::config::LlamaConfig;
use crate::EngineError;

/// A weight matrix in PyTorch's `Linear` orientation: `rows` outputs by `cols` inputs,
/// row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct Matrix {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f32>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct LayerWeights {
    pub input_norm: Vec<f32>,
    pub q_proj: Matrix,
    pub k_proj: Matrix,
    pub v_proj: Matrix,
    pub o_proj: Matrix,
    pub post_attention_norm: Vec<f32>,
    pub gate_proj: Matrix,
    pub up_proj: Matrix,
    pub down_proj: Matrix,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Weights {
    pub embed_tokens: Matrix,
    pub layers: Vec<LayerWeights>,
    pub norm: Vec<f32>,
    /// `None` when the output projection is tied to the embeddings.
    pub lm_head: Option<Matrix>,
}

/// Every tensor of a checkpoint by its Hugging Face name, with its shape.
fn tensor_shapes(config: &LlamaConfig) -> Vec<(String, Vec<usize>)> {
    let (h, i, v) = (
        config.hidden_size,
        config.intermediate_size,
        config.vocab_size,
    );
    let q = config.num_attention_heads * config.head_dim();
    let kv = config.num_kv_heads() * config.head_dim();
    let mut shapes = vec![("model.embed_tokens.weight".to_string(), vec![v, h])];
    for l in 0..config.num_hidden_layers {
        let p = format!("model.layers.{l}");
        shapes.extend([
            (format!("{p}.input_layernorm.weight"), vec![h]),
            (format!("{p}.self_attn.q_proj.weight"), vec![q, h]),
            (format!("{p}.self_attn.k_proj.weight"), vec![kv, h]),
            (format!("{p}.self_attn.v_proj.weight"), vec![kv, h]),
            (format!("{p}.self_attn.o_proj.weight"), vec![h, q]),
            (format!("{p}.post_attention_layernorm.weight"), vec![h]),
            (format!("{p}.mlp.gate_proj.weight"), vec![i, h]),
            (format!("{p}.mlp.up_proj.weight"), vec![i, h]),
            (format!("{p}.mlp.down_proj.weight"), vec![h, i]),
        ]);
    }
    shapes.push(("model.norm.weight".to_string(), vec![h]));
    if !config.tie_word_embeddings {
        shapes.push(("lm_head.weight".to_string(), vec![v, h]));
    }
    shapes
}

impl Weights {
    /// Builds the weights from named tensors in `tensor_shapes` order.
    fn assemble(
        config: &LlamaConfig,
        mut take: impl FnMut(&str, &[usize]) -> Result<Vec<f32>, EngineError>,
    ) -> Result<Self, EngineError> {
        let mut matrix = |name: &str, shape: &[usize]| -> Result<Matrix, EngineError> {
            Ok(Matrix {
                rows: shape[0],
                cols: shape.get(1).copied().unwrap_or(1),
                data: take(name, shape)?,
            })
        };
        let shapes = tensor_shapes(config);
        let mut named = shapes.iter();
        let mut next = || named.next().expect("tensor_shapes lists every tensor");
        let (name, shape) = next();
        let embed_tokens = matrix(name, shape)?;
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for _ in 0..config.num_hidden_layers {
            let mut m = |(name, shape): &(String, Vec<usize>)| matrix(name, shape);
            let input_norm = m(next())?.data;
            let q_proj = m(next())?;
            let k_proj = m(next())?;
            let v_proj = m(next())?;
            let o_proj = m(next())?;
            let post_attention_norm = m(next())?.data;
            let gate_proj = m(next())?;
            let up_proj = m(next())?;
            let down_proj = m(next())?;
            layers.push(LayerWeights {
                input_norm,
                q_proj,
                k_proj,
                v_proj,
                o_proj,
                post_attention_norm,
                gate_proj,
                up_proj,
                down_proj,
            });
        }
        let (name, shape) = next();
        let norm = matrix(name, shape)?.data;
        let lm_head = if config.tie_word_embeddings {
            None
        } else {
            let (name, shape) = next();
            Some(matrix(name, shape)?)
        };
        Ok(Weights {
            embed_tokens,
            layers,
            norm,
            lm_head,
        })
    }

    /// Deterministic random weights for `config`. Values are rounded to bf16 so that a
    /// checkpoint written in bf16 reloads to exactly these weights.
    pub fn random(config: &LlamaConfig, seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        Self::assemble(config, |name, shape| {
            let len: usize = shape.iter().product();
            let values = if shape.len() == 1 {
                // Norm weights near 1, as trained models have.
                (0..len)
                    .map(|_| 1.0 + rng.gen_range(-0.1f32..0.1))
                    .collect::<Vec<_>>()
            } else {
                let scale = if name.contains("embed_tokens") {
                    1.0
                } else {
                    (3.0 / shape[1] as f32).sqrt()
                };
                (0..len).map(|_| rng.gen_range(-scale..scale)).collect()
            };
            Ok(values
                .into_iter()
                .map(|v| bf16::from_f32(v).to_f32())
                .collect())
        })
        .expect("random weights cannot fail")
    }

    /// Loads every `*.safetensors` shard in `dir` (bf16, f16 or f32 tensors).
    pub fn load(dir: &Path, config: &LlamaConfig) -> Result<Self, EngineError> {
        let shards = safetensors_files(dir)?;
        let maps = shards
            .iter()
            .map(|path| {
                let file = File::open(path).map_err(|e| io_error(path, e))?;
                // SAFETY: the checkpoint is read-only input; a file truncated under us by
                // another process is outside what the engine guards against, as for any
                // model loader that maps weights.
                unsafe { memmap2::Mmap::map(&file) }.map_err(|e| io_error(path, e))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut tensors: HashMap<String, (TensorView<'_>, &Path)> = HashMap::new();
        for (map, path) in maps.iter().zip(&shards) {
            let st = SafeTensors::deserialize(map)
                .map_err(|e| EngineError::Model(format!("{}: {e}", path.display())))?;
            for (name, view) in st.tensors() {
                tensors.insert(name, (view, path.as_path()));
            }
        }
        Self::assemble(config, |name, shape| {
            let (view, path) = tensors.get(name).ok_or_else(|| {
                EngineError::Model(format!("{}: tensor {name} is missing", dir.display()))
            })?;
            if view.shape() != shape {
                return Err(EngineError::Model(format!(
                    "{}: tensor {name} has shape {:?}, expected {shape:?}",
                    path.display(),
                    view.shape()
                )));
            }
            to_f32(view).map_err(|dtype| {
                EngineError::Model(format!(
                    "{}: tensor {name} has dtype {dtype:?}; bf16, f16 or f32 expected",
                    path.display()
                ))
            })
        })
    }

    /// Writes `config.json` and `model.safetensors` (bf16) into `dir`.
    pub fn save(&self, config: &LlamaConfig, dir: &Path) -> Result<(), EngineError> {
        std::fs::create_dir_all(dir).map_err(|e| io_error(dir, e))?;
        let config_json = serde_json::to_string_pretty(config)
            .map_err(|e| EngineError::Model(format!("config.json: {e}")))?;
        let config_path = dir.join("config.json");
        std::fs::write(&config_path, config_json).map_err(|e| io_error(&config_path, e))?;
        let mut encoded: BTreeMap<String, (Vec<usize>, Vec<u8>)> = BTreeMap::new();
        let mut tensors = tensor_shapes(config).into_iter();
        let mut add = |values: &[f32]| {
            let (name, shape) = tensors.next().expect("tensor_shapes lists every tensor");
            let bytes = values
                .iter()
                .flat_map(|v| bf16::from_f32(*v).to_le_bytes())
                .collect();
            encoded.insert(name, (shape, bytes));
        };
        add(&self.embed_tokens.data);
        for layer in &self.layers {
            for values in [
                &layer.input_norm,
                &layer.q_proj.data,
                &layer.k_proj.data,
                &layer.v_proj.data,
                &layer.o_proj.data,
                &layer.post_attention_norm,
                &layer.gate_proj.data,
                &layer.up_proj.data,
                &layer.down_proj.data,
            ] {
                add(values);
            }
        }
        add(&self.norm);
        if let Some(lm_head) = &self.lm_head {
            add(&lm_head.data);
        }
        let views = encoded
            .iter()
            .map(|(name, (shape, bytes))| {
                TensorView::new(Dtype::BF16, shape.clone(), bytes).map(|v| (name.clone(), v))
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| EngineError::Model(e.to_string()))?;
        let path = dir.join("model.safetensors");
        safetensors::serialize_to_file(views, &None, &path)
            .map_err(|e| EngineError::Model(format!("{}: {e}", path.display())))
    }

    /// The output projection: `lm_head`, or the embeddings when tied.
    pub fn output_projection(&self) -> &Matrix {
        self.lm_head.as_ref().unwrap_or(&self.embed_tokens)
    }
}

fn io_error(path: &Path, e: std::io::Error) -> EngineError {
    EngineError::Model(format!("{}: {e}", path.display()))
}

fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>, EngineError> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| io_error(dir, e))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(EngineError::Model(format!(
            "{}: no *.safetensors files",
            dir.display()
        )));
    }
    Ok(files)
}

fn to_f32(view: &TensorView<'_>) -> Result<Vec<f32>, Dtype> {
    let data = view.data();
    Ok(match view.dtype() {
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::BF16 => data
            .chunks_exact(2)
            .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::F16 => data
            .chunks_exact(2)
            .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        other => return Err(other),
    })
}
