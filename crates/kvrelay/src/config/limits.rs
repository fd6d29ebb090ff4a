//! Size and nesting limits, checked before a config document reaches a parser.
//!
//! serde_yaml_ng stops at 128 levels of nesting, but only after libyaml's scanner has read
//! the whole document, and that scanner spends time quadratic in the flow nesting depth:
//! 100 k unclosed `[` take over 10 s before the recursion-limit error. Running the same
//! scanner first, token by token, and stopping at the limit refuses such a document in
//! milliseconds. Counting the collections the parser's own tokens open and close means
//! quotes, comments and block scalars are read exactly as the parser reads them, so no
//! text can hide nesting from the check. serde_json is linear and stops at 128 levels on
//! its own; JSON, which libyaml reads as YAML, goes through the same check so both report
//! the same limit.

use std::io::Read;
use std::mem::MaybeUninit;
use std::path::Path;

use unsafe_libyaml::{
    yaml_parser_delete, yaml_parser_initialize, yaml_parser_scan, yaml_parser_set_input_string,
    yaml_parser_t, yaml_token_delete, yaml_token_t, YAML_BLOCK_END_TOKEN,
    YAML_BLOCK_MAPPING_START_TOKEN, YAML_BLOCK_SEQUENCE_START_TOKEN, YAML_FLOW_MAPPING_END_TOKEN,
    YAML_FLOW_MAPPING_START_TOKEN, YAML_FLOW_SEQUENCE_END_TOKEN, YAML_FLOW_SEQUENCE_START_TOKEN,
    YAML_NO_TOKEN, YAML_STREAM_END_TOKEN,
};

use super::ConfigError;

/// Bytes a config document may have; real LMCache and vLLM configs are a few KB.
pub const MAX_DOCUMENT_BYTES: usize = 1 << 20;

/// Nesting levels (block and flow collections together) a config document may have.
/// LMCache's config nests three levels at most (`extra_config` values); half of the
/// parser's own 128 leaves room for anything real.
pub const MAX_NESTING_DEPTH: usize = 64;

/// Refuses a document over [`MAX_DOCUMENT_BYTES`] or nested deeper than
/// [`MAX_NESTING_DEPTH`], naming `origin` and the limit.
pub(crate) fn check_document(text: &str, origin: &str) -> Result<(), ConfigError> {
    if text.len() > MAX_DOCUMENT_BYTES {
        return Err(ConfigError::DocumentTooLarge {
            origin: origin.to_string(),
            limit: MAX_DOCUMENT_BYTES,
        });
    }
    match line_past_nesting_limit(text, MAX_NESTING_DEPTH) {
        Some(line) => Err(ConfigError::NestingTooDeep {
            origin: origin.to_string(),
            limit: MAX_NESTING_DEPTH,
            line,
        }),
        None => Ok(()),
    }
}

/// Reads a config file of at most [`MAX_DOCUMENT_BYTES`]; reading stops there, so a huge
/// or endless file (`/dev/zero`) is refused without being read whole.
pub(crate) fn read_document(path: &Path) -> Result<String, ConfigError> {
    let io_error = |source| ConfigError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io_error)?;
    let mut bytes = Vec::new();
    file.take(MAX_DOCUMENT_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(io_error)?;
    if bytes.len() > MAX_DOCUMENT_BYTES {
        return Err(ConfigError::DocumentTooLarge {
            origin: path.display().to_string(),
            limit: MAX_DOCUMENT_BYTES,
        });
    }
    String::from_utf8(bytes)
        .map_err(|e| io_error(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))
}

/// Whether `text` nests deeper than `limit` levels as libyaml's scanner (the one
/// serde_yaml_ng parses with) tokenizes it; `Some(line)` names the line, counted from 1,
/// where the limit is crossed. Scanning stops there, so the cost stays linear however deep
/// the document goes: the scanner's work per token grows with the depth reached so far.
/// Text the scanner rejects is left for the parser to report.
fn line_past_nesting_limit(text: &str, limit: usize) -> Option<usize> {
    let mut parser = MaybeUninit::<yaml_parser_t>::uninit();
    let parser = parser.as_mut_ptr();
    // SAFETY: `yaml_parser_initialize` zeroes and initializes the parser it is given; on
    // failure it has allocated nothing.
    if unsafe { yaml_parser_initialize(parser) }.fail {
        return None;
    }
    // SAFETY: the parser is initialized; it reads `text` through the pointer and length
    // only until `yaml_parser_delete` below, while `text` is borrowed.
    unsafe { yaml_parser_set_input_string(parser, text.as_ptr(), text.len() as u64) };
    let mut depth = 0usize;
    let past_limit = loop {
        let mut token = MaybeUninit::<yaml_token_t>::uninit();
        let token = token.as_mut_ptr();
        // SAFETY: the parser is initialized with its input; `yaml_parser_scan` zeroes the
        // token, then fills it in, so it is initialized once the call returns, even on
        // failure.
        let failed = unsafe { yaml_parser_scan(parser, token) }.fail;
        // SAFETY: `token` was initialized by the scan just above.
        let (kind, line) = unsafe { ((*token).type_, (*token).start_mark.line) };
        // SAFETY: frees what the scan allocated for this token (a scalar's text); `token`
        // is not read after this.
        unsafe { yaml_token_delete(token) };
        if failed {
            break None;
        }
        match kind {
            YAML_BLOCK_SEQUENCE_START_TOKEN
            | YAML_BLOCK_MAPPING_START_TOKEN
            | YAML_FLOW_SEQUENCE_START_TOKEN
            | YAML_FLOW_MAPPING_START_TOKEN => {
                depth += 1;
                if depth > limit {
                    break Some(line as usize + 1);
                }
            }
            YAML_BLOCK_END_TOKEN | YAML_FLOW_SEQUENCE_END_TOKEN | YAML_FLOW_MAPPING_END_TOKEN => {
                depth = depth.saturating_sub(1)
            }
            YAML_STREAM_END_TOKEN | YAML_NO_TOKEN => break None,
            _ => {}
        }
    };
    // SAFETY: the parser was initialized above and is not used after this.
    unsafe { yaml_parser_delete(parser) };
    past_limit
}
