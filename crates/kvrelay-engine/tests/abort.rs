//! `Engine::abort_request`: an aborted request ends at once as `Aborted`, gives its KV
//! blocks back, and leaves the other requests' tokens untouched.

use std::time::Duration;

use kvrelay_engine::{AbortOutcome, Engine, EngineConfig, FinishReason, Model, SamplingParams};

fn engine(num_blocks: usize) -> Engine {
    let config = EngineConfig {
        block_size: 16,
        num_blocks: Some(num_blocks),
        max_model_len: 256,
        // A request that can never get blocks fails fast instead of after two minutes.
        stall_timeout: Duration::from_secs(2),
        ..EngineConfig::default()
    };
    Engine::new(Model::tiny_random(config.max_model_len), config).unwrap()
}

fn prompt(len: usize, salt: u32) -> Vec<u32> {
    (0..len as u32).map(|t| (t * 7 + salt) % 256).collect()
}

#[test]
fn an_aborted_request_ends_now_and_frees_its_blocks() {
    let alone = engine(16)
        .generate(&[prompt(40, 3)], SamplingParams::greedy(8))
        .unwrap()
        .remove(0);

    // 8 blocks: the first request holds 8 (100 prompt + 20 tokens), so the second (40 + 8
    // tokens, 3 blocks) can only run once the first gave its blocks back.
    let mut engine = engine(8);
    engine
        .add_request("long", prompt(100, 1), SamplingParams::greedy(20))
        .unwrap();
    for _ in 0..3 {
        assert!(engine.step().unwrap().is_empty());
    }
    let sampled = engine.output_token_ids("long").unwrap().len();
    assert!(sampled > 0, "the long request is decoding");
    engine
        .add_request("next", prompt(40, 3), SamplingParams::greedy(8))
        .unwrap();
    let AbortOutcome::Finished(aborted) = engine.abort_request("long") else {
        panic!("a running request ends at once");
    };
    assert_eq!(aborted.finish_reason, FinishReason::Aborted);
    assert_eq!(aborted.request_id, "long");
    assert_eq!(aborted.output_token_count, sampled);
    assert!(engine.output_token_ids("long").is_none());
    assert!(matches!(
        engine.abort_request("long"),
        AbortOutcome::NotFound
    ));
    let rest = engine.run_to_completion().unwrap();
    assert_eq!(rest.len(), 1);
    assert_eq!(rest[0].request_id, "next");
    assert_eq!(rest[0].output_token_ids, alone.output_token_ids);
    assert!(!engine.has_unfinished());
}

#[test]
fn a_waiting_request_is_aborted_before_it_runs() {
    let mut engine = engine(16);
    engine
        .add_request("queued", prompt(30, 5), SamplingParams::greedy(4))
        .unwrap();
    let AbortOutcome::Finished(aborted) = engine.abort_request("queued") else {
        panic!("a waiting request ends at once");
    };
    assert_eq!(aborted.finish_reason, FinishReason::Aborted);
    assert_eq!(aborted.output_token_count, 0);
    assert!(!engine.has_unfinished());
    assert!(matches!(
        engine.abort_request("never-added"),
        AbortOutcome::NotFound
    ));
}
