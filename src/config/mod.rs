//! Reading the YAML file: parse with serde (unknown keys rejected) into the
//! file's structs, with positions to place every problem at file:line:column.
//! Knows nothing of compiled policy: `load` runs both.

pub mod file;
pub mod listen;
pub mod observe;
pub mod position;

use std::fmt;
use std::path::{Path, PathBuf};

use file::FileConfig;
pub use listen::{HttpProxy, Listen};
use position::{Position, Positions};

/// One problem in the file, where it is and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    pub position: Position,
    /// Where in the document, as `routes[2].match.path`; empty for the whole file.
    pub field: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: ",
            self.file.display(),
            self.position.line,
            self.position.column
        )?;
        if !self.field.is_empty() {
            write!(f, "{}: ", self.field)?;
        }
        f.write_str(&self.message)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<ConfigError>),
}

/// Upper bound on the policy file; a larger one is refused before parsing.
pub const MAX_CONFIG_BYTES: u64 = 4 * 1024 * 1024;

/// A whole file as UTF-8 text, refused unread when larger than `max` bytes.
pub fn read_text(path: &Path, max: u64) -> Result<String, LoadError> {
    let read_err = |source| LoadError::Read {
        path: path.to_path_buf(),
        source,
    };
    let len = std::fs::metadata(path).map_err(read_err)?.len();
    if len > max {
        return Err(read_err(std::io::Error::other(format!(
            "larger than {max} bytes"
        ))));
    }
    let bytes = std::fs::read(path).map_err(read_err)?;
    String::from_utf8(bytes).map_err(|_| whole_file(path, "not UTF-8 text"))
}

/// A problem with the file as a whole, placed at its start.
pub fn whole_file(path: &Path, message: &str) -> LoadError {
    LoadError::Invalid(vec![ConfigError {
        file: path.to_path_buf(),
        position: Position { line: 1, column: 1 },
        field: String::new(),
        message: message.into(),
    }])
}

/// An empty (or comments-only) YAML document: a truncated write, never "nothing".
pub fn is_empty_yaml(source: &str) -> bool {
    matches!(
        serde_yaml::from_str::<serde_yaml::Value>(source),
        Ok(serde_yaml::Value::Null)
    )
}

/// Parses `source` into the file's structs and the index of its positions;
/// `path` names it in errors.
pub fn parse_file(source: &str, path: &Path) -> Result<(FileConfig, Positions), LoadError> {
    // An empty file is a truncated write, not a policy that denies everything.
    if is_empty_yaml(source) {
        return Err(whole_file(path, "the file is empty"));
    }
    let file: FileConfig = match serde_yaml::from_str(source) {
        Ok(f) => f,
        Err(e) => return Err(LoadError::Invalid(vec![serde_error(&e, path)])),
    };
    Ok((file, Positions::index(source)))
}

pub fn serde_error(e: &serde_yaml::Error, path: &Path) -> ConfigError {
    let position = e
        .location()
        .map_or(Position { line: 1, column: 1 }, |l| Position {
            line: l.line(),
            column: l.column(),
        });
    // serde_yaml appends " at line L column C"; we put the position in front.
    let text = e.to_string();
    let text = text.split(" at line ").next().unwrap_or(&text);
    let (field, message) = match text.split_once(": ") {
        Some((field, msg)) if !field.contains(' ') => (field.to_string(), msg.to_string()),
        _ => (String::new(), text.to_string()),
    };
    ConfigError {
        file: path.to_path_buf(),
        position,
        field,
        message,
    }
}

/// Collects errors and warnings while compiling; each is placed by its field path.
pub struct Problems<'a> {
    file: &'a Path,
    positions: &'a Positions,
    pub errors: Vec<ConfigError>,
    pub warnings: Vec<ConfigError>,
}

impl<'a> Problems<'a> {
    pub fn new(file: &'a Path, positions: &'a Positions) -> Self {
        Problems {
            file,
            positions,
            errors: Vec::new(),
            warnings: Vec::new(),
        }
    }

    fn make(&self, field: String, message: String) -> ConfigError {
        ConfigError {
            file: self.file.to_path_buf(),
            position: self.positions.find(&field),
            field,
            message,
        }
    }

    pub fn error(&mut self, field: impl Into<String>, message: impl Into<String>) {
        let e = self.make(field.into(), message.into());
        self.errors.push(e);
    }

    pub fn warn(&mut self, field: impl Into<String>, message: impl Into<String>) {
        let e = self.make(field.into(), message.into());
        self.warnings.push(e);
    }
}

/// `30s`, `5m`, `1h`, `250ms`, `1m30s`. A bare number is refused: the unit is not
/// obvious to the next reader.
pub fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let s = text.trim();
    if s.is_empty() {
        return Err("empty duration".into());
    }
    let mut total = std::time::Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(format!("invalid duration {text:?}: expected a number"));
        }
        let n: u64 = rest[..digits]
            .parse()
            .map_err(|_| format!("invalid duration {text:?}: number too large"))?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let part = match unit {
            "ms" => std::time::Duration::from_millis(n),
            "s" => std::time::Duration::from_secs(n),
            "m" => std::time::Duration::from_secs(n.saturating_mul(60)),
            "h" => std::time::Duration::from_secs(n.saturating_mul(3600)),
            "" => {
                return Err(format!(
                    "invalid duration {text:?}: add a unit (ms, s, m, h)"
                ));
            }
            u => return Err(format!("invalid duration {text:?}: unknown unit {u:?}")),
        };
        total = total.saturating_add(part);
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert!(parse_duration("30").unwrap_err().contains("add a unit"));
        assert!(parse_duration("3d").unwrap_err().contains("unknown unit"));
        assert!(parse_duration("").is_err());
        assert!(parse_duration("s").is_err());
    }
}
