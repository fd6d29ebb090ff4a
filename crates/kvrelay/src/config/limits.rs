//! Size and nesting limits, checked before a config document reaches a parser.
//!
//! serde_yaml_ng stops at 128 levels of nesting, but only after libyaml's scanner has read
//! the whole document, and that scanner spends time quadratic in the flow nesting depth:
//! 100 k unclosed `[` take over 10 s before the recursion-limit error. A linear pre-scan
//! of the text refuses such a document in microseconds. serde_json is linear and stops at
//! 128 levels on its own; JSON goes through the same scan so both report the same limit.

use std::io::Read;
use std::path::Path;

use super::ConfigError;

/// Bytes a config document may have; real LMCache and vLLM configs are a few KB.
pub const MAX_DOCUMENT_BYTES: usize = 1 << 20;

/// Nesting levels (block and flow together) a config document may have. LMCache's config
/// nests three levels at most (`extra_config` values); the scan's count is an estimate, so
/// the limit is generous, and half of the parser's own 128.
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
    let mut scan = NestingScan::default();
    for (index, line) in text.lines().enumerate() {
        if scan.line(line.as_bytes()) > MAX_NESTING_DEPTH {
            return Err(ConfigError::NestingTooDeep {
                origin: origin.to_string(),
                limit: MAX_NESTING_DEPTH,
                line: index + 1,
            });
        }
    }
    Ok(())
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

/// A line-by-line estimate of YAML nesting: block levels by indentation (and one per
/// `- `, `? ` or `: ` that opens a node on the same line) plus open `[` and `{`.
///
/// It is not a YAML parser. It skips quoted scalars, comments and block scalars so that
/// brackets in text do not count, and where YAML is ambiguous line by line it counts a
/// bracket rather than skip it, so its depth errs high; the limit leaves room for that.
#[derive(Default)]
struct NestingScan {
    /// Columns of the open block nodes, innermost last.
    block_indents: Vec<usize>,
    /// Open `[` and `{`.
    flow_depth: usize,
    /// The quote character of a quoted scalar still open at the end of the last line.
    open_quote: Option<u8>,
    /// While inside a `|` or `>` block scalar: the indentation of the line that began it.
    block_scalar_parent: Option<usize>,
    /// Whether a node may begin at the current position (flow context carries it across
    /// lines; a quote begins a quoted scalar only there, elsewhere it is plain text).
    token_start: bool,
}

impl NestingScan {
    fn depth(&self) -> usize {
        self.block_indents.len() + self.flow_depth
    }

    /// Scans one line (without its line break); returns the deepest nesting on it.
    fn line(&mut self, line: &[u8]) -> usize {
        let indent = line.iter().take_while(|&&b| b == b' ').count();
        let blank = line[indent..].iter().all(u8::is_ascii_whitespace);
        if let Some(parent) = self.block_scalar_parent {
            if blank || indent > parent {
                return self.depth();
            }
            self.block_scalar_parent = None;
        }
        let mut at = indent;
        if self.open_quote.is_none() && self.flow_depth == 0 {
            if blank || line[indent] == b'#' {
                return self.depth();
            }
            while self.block_indents.last().is_some_and(|&top| top > indent) {
                self.block_indents.pop();
            }
            if self.block_indents.last().is_none_or(|&top| top < indent) {
                self.block_indents.push(indent);
            }
            // `- - x`, `- ? x`: each indicator nests the node after it one level deeper.
            while matches!(line.get(at), Some(b'-' | b'?' | b':'))
                && matches!(line.get(at + 1), None | Some(b' '))
            {
                at += 1;
                while line.get(at) == Some(&b' ') {
                    at += 1;
                }
                if at < line.len() {
                    self.block_indents.push(at);
                }
            }
            self.token_start = true;
        }
        let mut deepest = self.depth();
        let mut prev = b' ';
        let mut i = at;
        while i < line.len() {
            let b = line[i];
            if let Some(quote) = self.open_quote {
                // `\x` escapes in double quotes, `''` in single quotes.
                let escaped = match quote {
                    b'"' => b == b'\\',
                    _ => b == b'\'' && line.get(i + 1) == Some(&b'\''),
                };
                if escaped {
                    i += 2;
                    continue;
                }
                if b == quote {
                    self.open_quote = None;
                    self.token_start = false;
                }
                prev = b;
                i += 1;
                continue;
            }
            match b {
                b'#' if prev == b' ' || prev == b'\t' => break,
                b'"' | b'\'' if self.token_start => self.open_quote = Some(b),
                // In block context a bracket opens a collection only where a node begins;
                // inside a plain scalar it is text.
                b'[' | b'{' if self.token_start || self.flow_depth > 0 => {
                    self.flow_depth += 1;
                    deepest = deepest.max(self.depth());
                }
                b']' | b'}' if self.flow_depth > 0 => self.flow_depth -= 1,
                b'|' | b'>'
                    if self.token_start
                        && self.flow_depth == 0
                        && is_block_scalar_header(&line[i + 1..]) =>
                {
                    self.block_scalar_parent = Some(indent);
                    break;
                }
                _ => {}
            }
            let blank_next = matches!(line.get(i + 1), None | Some(b' ' | b'\t'));
            self.token_start = match b {
                b'[' | b'{' | b',' | b':' if self.flow_depth > 0 => true,
                // `: ` ends a key anywhere; `- ` and `? ` are indicators only where a node
                // could begin, elsewhere they are text.
                b':' => blank_next,
                b'-' | b'?' => self.token_start && blank_next,
                b' ' | b'\t' => self.token_start,
                _ => false,
            };
            prev = b;
            i += 1;
        }
        deepest
    }
}

/// Whether what follows a `|` or `>` makes it a block scalar header: indentation and
/// chomping indicators, then nothing but blanks or a comment.
fn is_block_scalar_header(rest: &[u8]) -> bool {
    let indicators = rest
        .iter()
        .take_while(|b| b.is_ascii_digit() || matches!(b, b'+' | b'-'))
        .count();
    let rest = rest[indicators..].trim_ascii_start();
    rest.is_empty() || rest[0] == b'#'
}
