//! What a smoke run ends with on stderr: each phase's figures in a few lines, and whether
//! decode produced exactly what one engine alone produces for the same prompts.

use std::fmt::Write;

use serde_json::Value;

use crate::engine_args::TINY_RANDOM;

/// How decode compares with a single-engine run of the same prompts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Every request's token ids and logits digest are equal; holds the request count.
    Equal(usize),
    /// The first difference, in request order, as a sentence.
    Differs(String),
}

/// Compares decode's requests with the reference run's, request by request in order: the
/// token ids first (naming the first token that differs), then the logits digest.
pub fn compare(decode: &Value, reference: &Value) -> Verdict {
    let requests = |phase: &Value| phase["requests"].as_array().cloned().unwrap_or_default();
    let (ours, theirs) = (requests(decode), requests(reference));
    if ours.len() != theirs.len() {
        return Verdict::Differs(format!(
            "decode ran {} requests, the single-engine run {}",
            ours.len(),
            theirs.len()
        ));
    }
    for (decoded, single) in ours.iter().zip(&theirs) {
        let id = decoded["request_id"].as_str().unwrap_or("?");
        let tokens = |r: &Value| -> Vec<Value> {
            r["output_token_ids"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        };
        let (a, b) = (tokens(decoded), tokens(single));
        if let Some(i) = (0..a.len().max(b.len())).find(|&i| a.get(i) != b.get(i)) {
            let show =
                |t: Option<&Value>| t.map_or("nothing (ended)".to_string(), Value::to_string);
            return Verdict::Differs(format!(
                "request {id}: output token {i} is {} in decode but {} in the single-engine run",
                show(a.get(i)),
                show(b.get(i))
            ));
        }
        if decoded["logits_digest"] != single["logits_digest"] {
            return Verdict::Differs(format!(
                "request {id}: the token ids agree but the logits digest is {} in decode and {} in the single-engine run",
                decoded["logits_digest"], single["logits_digest"]
            ));
        }
    }
    Verdict::Equal(ours.len())
}

/// The end of a `--role both` run, for people: per phase the requests, hit and
/// recomputed tokens, bytes moved and their rate, time to first token; decode's output;
/// and the verdict (`None`: not verified).
pub fn human_summary(
    prefill: &Value,
    decode: &Value,
    verdict: Option<&Verdict>,
    model: &str,
) -> String {
    let mut out = String::from("\nkvrelay smoke summary\n");
    for (name, phase, moved, verb) in [
        ("prefill", prefill, "save", "saved"),
        ("decode", decode, "load", "loaded"),
    ] {
        let _ = writeln!(out, "  {name:<8}{}", phase_line(phase, moved, verb));
    }
    let first = &decode["requests"][0];
    let ids = first["output_token_ids"].to_string();
    if model == TINY_RANDOM {
        let _ = writeln!(
            out,
            "  output  {TINY_RANDOM} has random weights, so its text is noise; compare token ids: {ids}"
        );
    } else {
        let _ = writeln!(
            out,
            "  output  {:?} (token ids {ids})",
            first["output_text"].as_str().unwrap_or_default()
        );
    }
    let verdict = match verdict {
        Some(Verdict::Equal(n)) => {
            format!(
                "yes (token ids and logits digest, {n} request{})",
                plural(*n)
            )
        }
        Some(Verdict::Differs(difference)) => format!("NO: {difference}"),
        None => "not checked (--no-verify)".into(),
    };
    let _ = writeln!(out, "  decode output equals a single-engine run: {verdict}");
    out
}

/// One phase's figures: `moved` is "load" or "save" (the JSON field prefix).
fn phase_line(phase: &Value, moved: &str, verb: &str) -> String {
    let requests = phase["requests"].as_array().cloned().unwrap_or_default();
    let sum = |field: &str| -> f64 {
        requests
            .iter()
            .map(|r| r[field].as_f64().unwrap_or(0.0))
            .sum()
    };
    let (bytes, secs) = (sum(&format!("{moved}_bytes")), sum(&format!("{moved}_sec")));
    let rate = if secs > 0.0 {
        format!(" at {:.2} GB/s", bytes / secs / 1e9)
    } else {
        String::new()
    };
    let ttfts: Vec<f64> = requests
        .iter()
        .filter_map(|r| r["time_to_first_token_sec"].as_f64())
        .collect();
    let (low, high) = ttfts.iter().fold((f64::INFINITY, 0.0f64), |(lo, hi), &t| {
        (lo.min(t), hi.max(t))
    });
    let ttft = match ttfts.len() {
        0 => "-".to_string(),
        _ if high - low < 0.0005 => format!("{high:.3} s"),
        _ => format!("{low:.3}–{high:.3} s"),
    };
    format!(
        "{} request{}, {} prompt tokens: hit {}, recomputed {}; {verb} {:.1} MB{rate}; TTFT {ttft}",
        requests.len(),
        plural(requests.len()),
        sum("prompt_token_count"),
        sum("hit_tokens"),
        sum("recomputed_tokens"),
        bytes / 1e6,
    )
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

#[cfg(test)]
mod tests {
    use super::{compare, human_summary, Verdict};
    use serde_json::json;

    fn phase(tokens: &[&[u32]], digest: &str) -> serde_json::Value {
        let requests: Vec<_> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| {
                json!({"request_id": format!("req-{i}"), "output_token_ids": t, "logits_digest": digest,
                       "prompt_token_count": 300, "hit_tokens": 256, "recomputed_tokens": 0,
                       "load_bytes": 2_000_000, "load_sec": 0.001, "save_bytes": 0, "save_sec": 0.0,
                       "time_to_first_token_sec": 0.02, "output_text": "hi"})
            })
            .collect();
        json!({ "requests": requests })
    }

    #[test]
    fn equal_runs_agree_and_the_first_difference_is_named() {
        let decode = phase(&[&[1, 2, 3], &[4, 5]], "ab");
        assert_eq!(compare(&decode, &decode), Verdict::Equal(2));
        let Verdict::Differs(why) = compare(&decode, &phase(&[&[1, 2, 3], &[4, 6]], "ab")) else {
            panic!("a different token must differ");
        };
        assert!(
            why.contains("req-1") && why.contains("token 1 is 5"),
            "{why}"
        );
        let Verdict::Differs(why) = compare(&decode, &phase(&[&[1, 2, 3], &[4, 5, 7]], "ab"))
        else {
            panic!("a longer reference must differ");
        };
        assert!(why.contains("token 2 is nothing (ended)"), "{why}");
        let Verdict::Differs(why) = compare(&decode, &phase(&[&[1, 2, 3], &[4, 5]], "cd")) else {
            panic!("another digest must differ");
        };
        assert!(why.contains("logits digest"), "{why}");
        assert!(matches!(
            compare(&decode, &phase(&[&[1, 2, 3]], "ab")),
            Verdict::Differs(_)
        ));
    }

    #[test]
    fn the_summary_reads_as_sentences() {
        let decode = phase(&[&[1, 2]], "ab");
        let text = human_summary(&decode, &decode, Some(&Verdict::Equal(1)), "tiny-random");
        assert!(text.contains("equals a single-engine run: yes"), "{text}");
        assert!(
            text.contains("text is noise; compare token ids: [1,2]"),
            "{text}"
        );
        assert!(text.contains("loaded 2.0 MB at 2.00 GB/s"), "{text}");
        assert!(text.contains("TTFT 0.020 s"), "{text}");
        let text = human_summary(&decode, &decode, None, "/models/llama");
        assert!(
            text.contains("\"hi\"") && text.contains("not checked"),
            "{text}"
        );
    }
}
