//! The Llama forward pass over a paged KV cache.

use std::path::Path;

use crate::config::LlamaConfig;
use crate::kv::{HeadSlot, PagedKv};
use crate::ops::{axpy, dot, linear, rms_norm, swiglu};
use crate::weights::Weights;
use crate::EngineError;

/// Rotary position embedding tables, with Llama-3 frequency scaling when configured.
struct Rope {
    half: usize,
    /// `cos` and `sin` per position and frequency, `positions × half` each.
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl Rope {
    fn new(config: &LlamaConfig, positions: usize) -> Self {
        let dim = config.head_dim();
        let half = dim / 2;
        let inv_freq: Vec<f64> = (0..half)
            .map(|i| {
                let freq = config.rope_theta.powf(-((2 * i) as f64) / dim as f64);
                match &config.rope_scaling {
                    Some(s) if s.rope_type == "llama3" => llama3_scaled(freq, s),
                    _ => freq,
                }
            })
            .collect();
        let mut cos = Vec::with_capacity(positions * half);
        let mut sin = Vec::with_capacity(positions * half);
        for pos in 0..positions {
            for f in &inv_freq {
                let angle = pos as f64 * f;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        Rope { half, cos, sin }
    }

    /// Rotates each head of `row` (Hugging Face's rotate-half convention).
    fn apply(&self, row: &mut [f32], pos: usize) {
        let cos = &self.cos[pos * self.half..][..self.half];
        let sin = &self.sin[pos * self.half..][..self.half];
        for head in row.chunks_exact_mut(2 * self.half) {
            let (x1, x2) = head.split_at_mut(self.half);
            for i in 0..self.half {
                let (a, b) = (x1[i], x2[i]);
                x1[i] = a * cos[i] - b * sin[i];
                x2[i] = b * cos[i] + a * sin[i];
            }
        }
    }
}

/// Llama-3's piecewise rescaling of one rotary frequency.
fn llama3_scaled(freq: f64, s: &crate::config::RopeScaling) -> f64 {
    let old_len = s.original_max_position_embeddings as f64;
    let low_freq_wavelen = old_len / s.low_freq_factor;
    let high_freq_wavelen = old_len / s.high_freq_factor;
    let wavelen = 2.0 * std::f64::consts::PI / freq;
    if wavelen < high_freq_wavelen {
        freq
    } else if wavelen > low_freq_wavelen {
        freq / s.factor
    } else {
        let smooth =
            (old_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
        (1.0 - smooth) * freq / s.factor + smooth * freq
    }
}

/// One sequence's share of a forward pass: tokens `start..start + tokens.len()`.
#[derive(Clone, Copy, Debug)]
pub struct SeqInput<'a> {
    pub tokens: &'a [u32],
    /// Position of the first token; KV of positions before it is already in the cache.
    pub start: usize,
    pub block_table: &'a [u32],
    /// Whether the last token's logits are wanted.
    pub logits: bool,
}

/// Hooks the forward pass calls around each layer's attention, as vLLM's attention layer
/// calls the connector.
pub trait LayerHooks {
    fn wait_for_layer_load(&mut self, layer: usize);
    fn save_kv_layer(&mut self, layer: usize);
}

/// Hooks that do nothing (no connector).
pub struct NoHooks;

impl LayerHooks for NoHooks {
    fn wait_for_layer_load(&mut self, _layer: usize) {}
    fn save_kv_layer(&mut self, _layer: usize) {}
}

pub struct Model {
    pub config: LlamaConfig,
    weights: Weights,
    rope: Rope,
}

impl Model {
    /// `max_positions` bounds the positions the RoPE tables cover (the max model length).
    pub fn new(config: LlamaConfig, weights: Weights, max_positions: usize) -> Self {
        let rope = Rope::new(&config, max_positions);
        Model {
            config,
            weights,
            rope,
        }
    }

    /// The embedded test model.
    pub fn tiny_random(max_positions: usize) -> Self {
        let config = LlamaConfig::tiny_random();
        let weights = Weights::random(&config, 0x006b_7672_656c_6179);
        Model::new(config, weights, max_positions)
    }

    /// A Hugging Face checkpoint directory (config.json + *.safetensors).
    pub fn load(dir: &Path, max_positions: usize) -> Result<Self, EngineError> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path)
            .map_err(|e| EngineError::Model(format!("{}: {e}", path.display())))?;
        let config = LlamaConfig::from_json(&text)?;
        let weights = Weights::load(dir, &config)?;
        Ok(Model::new(config, weights, max_positions))
    }

    pub fn weights(&self) -> &Weights {
        &self.weights
    }

    pub fn max_positions(&self) -> usize {
        self.rope.cos.len() / self.rope.half
    }

    /// Runs the batch, writing each new token's K and V into the caches, and returns the
    /// last token's logits for every sequence that asked for them.
    ///
    /// `kvs` holds one cache per tensor-parallel rank, each with its share of the KV heads
    /// (rank r: heads `r * n .. (r + 1) * n` of `n = num_kv_heads / kvs.len()`). Each rank
    /// attends for the query heads of its KV heads, on its own thread when there are
    /// several; the heads' outputs are gathered in head order and everything else is
    /// computed as with one rank, so the logits do not depend on the number of ranks.
    pub fn forward(
        &self,
        batch: &[SeqInput<'_>],
        kvs: &[&PagedKv],
        hooks: &mut dyn LayerHooks,
    ) -> Vec<Option<Vec<f32>>> {
        let c = &self.config;
        let (hidden, head_dim) = (c.hidden_size, c.head_dim());
        let (num_heads, num_kv_heads) = (c.num_attention_heads, c.num_kv_heads());
        let eps = c.rms_norm_eps as f32;
        let rows: usize = batch.iter().map(|s| s.tokens.len()).sum();
        let mut x = Vec::with_capacity(rows * hidden);
        for seq in batch {
            for &t in seq.tokens {
                let t = t as usize;
                x.extend_from_slice(&self.weights.embed_tokens.data[t * hidden..][..hidden]);
            }
        }
        for (layer, w) in self.weights.layers.iter().enumerate() {
            let h = rms_norm(&x, &w.input_norm, eps);
            let mut q = linear(&h, rows, &w.q_proj);
            let mut k = linear(&h, rows, &w.k_proj);
            let v = linear(&h, rows, &w.v_proj);
            let positions = batch.iter().flat_map(|s| s.start..s.start + s.tokens.len());
            for (row, pos) in positions.enumerate() {
                self.rope.apply(
                    &mut q[row * num_heads * head_dim..][..num_heads * head_dim],
                    pos,
                );
                self.rope.apply(
                    &mut k[row * num_kv_heads * head_dim..][..num_kv_heads * head_dim],
                    pos,
                );
            }
            hooks.wait_for_layer_load(layer);
            let qkv = Qkv {
                q: &q,
                k: &k,
                v: &v,
            };
            let shares: Vec<Vec<f32>> = if let [kv] = kvs {
                vec![self.attend_rank(kv, 0, layer, batch, qkv)]
            } else {
                std::thread::scope(|s| {
                    let ranks: Vec<_> = kvs
                        .iter()
                        .enumerate()
                        .map(|(rank, kv)| {
                            s.spawn(move || self.attend_rank(kv, rank, layer, batch, qkv))
                        })
                        .collect();
                    ranks
                        .into_iter()
                        .map(|r| r.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                        .collect()
                })
            };
            // Gather: rank r's heads are the r-th slice of every row.
            let share_len = num_heads / kvs.len() * head_dim;
            let mut attn = Vec::with_capacity(rows * num_heads * head_dim);
            for row in 0..rows {
                for share in &shares {
                    attn.extend_from_slice(&share[row * share_len..][..share_len]);
                }
            }
            hooks.save_kv_layer(layer);
            let o = linear(&attn, rows, &w.o_proj);
            x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
            let h = rms_norm(&x, &w.post_attention_norm, eps);
            let mut gate = linear(&h, rows, &w.gate_proj);
            let up = linear(&h, rows, &w.up_proj);
            swiglu(&mut gate, &up);
            let down = linear(&gate, rows, &w.down_proj);
            x.iter_mut().zip(&down).for_each(|(a, b)| *a += b);
        }
        let mut row_end = 0;
        batch
            .iter()
            .map(|seq| {
                row_end += seq.tokens.len();
                (seq.logits && !seq.tokens.is_empty()).then(|| {
                    let last = &x[(row_end - 1) * hidden..][..hidden];
                    let h = rms_norm(last, &self.weights.norm, eps);
                    linear(&h, 1, self.weights.output_projection())
                })
            })
            .collect()
    }

    /// Attention of one TP rank for every sequence of the batch: rows of its query heads'
    /// outputs (`num_heads / ranks` heads each).
    fn attend_rank(
        &self,
        kv: &PagedKv,
        rank: usize,
        layer: usize,
        batch: &[SeqInput<'_>],
        qkv: Qkv<'_>,
    ) -> Vec<f32> {
        let c = &self.config;
        let head_dim = c.head_dim();
        let (q_width, kv_width) = (
            c.num_attention_heads * head_dim,
            c.num_kv_heads() * head_dim,
        );
        let ranks = c.num_kv_heads() / kv.layout().spec().num_kv_heads;
        let share = q_width / ranks;
        let rows: usize = batch.iter().map(|s| s.tokens.len()).sum();
        let mut out = vec![0.0f32; rows * share];
        let mut row0 = 0;
        for seq in batch {
            let n = seq.tokens.len();
            let rows = Qkv {
                q: &qkv.q[row0 * q_width..][..n * q_width],
                k: &qkv.k[row0 * kv_width..][..n * kv_width],
                v: &qkv.v[row0 * kv_width..][..n * kv_width],
            };
            let out = &mut out[row0 * share..][..n * share];
            self.attend(kv, rank, layer, seq, rows, out);
            row0 += n;
        }
        out
    }

    /// Writes the new tokens' K and V of rank `rank`'s KV heads into its cache, then
    /// computes causal attention for its query heads over every cached position of the
    /// sequence. Keys and values are read back from the cache, so a token attends to
    /// exactly the bytes a connector would load.
    fn attend(
        &self,
        kv: &PagedKv,
        rank: usize,
        layer: usize,
        seq: &SeqInput<'_>,
        rows: Qkv<'_>,
        out: &mut [f32],
    ) {
        let c = &self.config;
        let (head_dim, num_heads, num_kv_heads) =
            (c.head_dim(), c.num_attention_heads, c.num_kv_heads());
        let spec = kv.layout().spec();
        let (block_size, local_kv_heads) = (spec.block_size, spec.num_kv_heads);
        let local_heads = num_heads / (num_kv_heads / local_kv_heads);
        // This rank's first KV head and first query head.
        let (kv0, q0) = (rank * local_kv_heads, rank * local_heads);
        let at = |pos: usize, plane: usize, head: usize| HeadSlot {
            layer,
            plane,
            block: seq.block_table[pos / block_size],
            slot: pos % block_size,
            head,
        };
        for (i, (k_row, v_row)) in rows
            .k
            .chunks_exact(num_kv_heads * head_dim)
            .zip(rows.v.chunks_exact(num_kv_heads * head_dim))
            .enumerate()
        {
            for head in 0..local_kv_heads {
                let range = (kv0 + head) * head_dim..(kv0 + head + 1) * head_dim;
                // SAFETY: the block belongs to this sequence, which the engine is computing;
                // the connector does not copy it during the forward pass.
                unsafe {
                    kv.write_head(at(seq.start + i, 0, head), &k_row[range.clone()]);
                    kv.write_head(at(seq.start + i, 1, head), &v_row[range]);
                }
            }
        }
        let end = seq.start + seq.tokens.len();
        // Per KV head of this rank, the sequence's keys and values as rows of head_dim floats.
        let mut keys = vec![0.0f32; local_kv_heads * end * head_dim];
        let mut values = vec![0.0f32; local_kv_heads * end * head_dim];
        for pos in 0..end {
            for head in 0..local_kv_heads {
                let row = (head * end + pos) * head_dim..(head * end + pos + 1) * head_dim;
                // SAFETY: as above.
                unsafe {
                    kv.read_head(at(pos, 0, head), &mut keys[row.clone()]);
                    kv.read_head(at(pos, 1, head), &mut values[row]);
                }
            }
        }
        let group = num_heads / num_kv_heads;
        let scale = 1.0 / (head_dim as f32).sqrt();
        let mut scores = vec![0.0f32; end];
        for (i, (q_row, out_row)) in rows
            .q
            .chunks_exact(num_heads * head_dim)
            .zip(out.chunks_exact_mut(local_heads * head_dim))
            .enumerate()
        {
            let visible = seq.start + i + 1;
            for head in 0..local_heads {
                let kv_head = head / group;
                let q = &q_row[(q0 + head) * head_dim..][..head_dim];
                let head_keys = &keys[kv_head * end * head_dim..][..visible * head_dim];
                let head_values = &values[kv_head * end * head_dim..][..visible * head_dim];
                let mut max = f32::NEG_INFINITY;
                for (s, key) in scores.iter_mut().zip(head_keys.chunks_exact(head_dim)) {
                    *s = dot(q, key) * scale;
                    max = max.max(*s);
                }
                let mut sum = 0.0f32;
                for s in &mut scores[..visible] {
                    *s = (*s - max).exp();
                    sum += *s;
                }
                let o = &mut out_row[head * head_dim..][..head_dim];
                for (s, value) in scores[..visible]
                    .iter()
                    .zip(head_values.chunks_exact(head_dim))
                {
                    axpy(o, s / sum, value);
                }
            }
        }
    }
}

/// Rows of queries, keys and values (every head) after RoPE.
#[derive(Clone, Copy)]
struct Qkv<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
}
