//! Where in the YAML source each value sits, so that errors found after serde
//! (an unknown provider, a bad regex) still say file:line:column.
//!
//! serde_yaml reports positions only for its own errors, so the file is walked once
//! more with yaml-rust2's event parser, recording the start of every node under a
//! path written the way serde_yaml writes it: `routes[2].require.providers[0]`.

use std::collections::HashMap;

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

/// 1-based line and column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Position {
    pub line: usize,
    pub column: usize,
}

#[derive(Debug, Default)]
pub struct Positions {
    nodes: HashMap<String, Position>,
}

impl Positions {
    /// Never fails: a file that does not parse here has already failed serde.
    pub fn index(source: &str) -> Self {
        let mut walker = Walker::default();
        let _ = Parser::new_from_str(source).load(&mut walker, false);
        Positions {
            nodes: walker.nodes,
        }
    }

    /// The position of `path`, or of its nearest recorded ancestor.
    pub fn find(&self, path: &str) -> Position {
        let mut path = path;
        loop {
            if let Some(pos) = self.nodes.get(path) {
                return *pos;
            }
            match path.rfind(['.', '[']) {
                Some(i) => path = &path[..i],
                None => {
                    return self
                        .nodes
                        .get("")
                        .copied()
                        .unwrap_or(Position { line: 1, column: 1 });
                }
            }
        }
    }
}

enum Frame {
    /// A mapping; `key` is set once its key scalar has been read.
    Map {
        key: Option<String>,
    },
    Seq {
        next: usize,
    },
}

#[derive(Default)]
struct Walker {
    stack: Vec<(String, Frame)>,
    nodes: HashMap<String, Position>,
}

impl Walker {
    /// The path of the node starting now, advancing the parent's state.
    /// `None` when the scalar is a mapping key rather than a value.
    fn child_path(&mut self, scalar: Option<&str>) -> Option<String> {
        let Some((parent, frame)) = self.stack.last_mut() else {
            return Some(String::new());
        };
        match frame {
            Frame::Seq { next } => {
                let path = format!("{parent}[{next}]");
                *next += 1;
                Some(path)
            }
            Frame::Map { key } => match key.take() {
                Some(k) if parent.is_empty() => Some(k),
                Some(k) => Some(format!("{parent}.{k}")),
                None => {
                    // A key: remember it for the value that follows.
                    *key = Some(scalar.unwrap_or("?").to_string());
                    None
                }
            },
        }
    }
}

impl MarkedEventReceiver for Walker {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        let pos = Position {
            line: mark.line(),
            column: mark.col() + 1,
        };
        match ev {
            Event::Scalar(value, ..) => {
                if let Some(path) = self.child_path(Some(&value)) {
                    self.nodes.entry(path).or_insert(pos);
                }
            }
            Event::Alias(_) => {
                if let Some(path) = self.child_path(Some("?")) {
                    self.nodes.entry(path).or_insert(pos);
                }
            }
            Event::MappingStart(..) | Event::SequenceStart(..) => {
                let is_map = matches!(ev, Event::MappingStart(..));
                // A complex key (a map used as a key) is not part of our schema.
                let path = self.child_path(None).unwrap_or_default();
                self.nodes.entry(path.clone()).or_insert(pos);
                let frame = if is_map {
                    Frame::Map { key: None }
                } else {
                    Frame::Seq { next: 0 }
                };
                self.stack.push((path, frame));
            }
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_resolve_to_positions() {
        let src = "listen:\n  grpc: 127.0.0.1:9001\nroutes:\n  - name: a\n    match: { path: /x }\n  - name: b\n    require:\n      providers: [corp, other]\n";
        let p = Positions::index(src);
        assert_eq!(p.find("listen.grpc"), Position { line: 2, column: 9 });
        assert_eq!(
            p.find("routes[1].name"),
            Position {
                line: 6,
                column: 11
            }
        );
        assert_eq!(
            p.find("routes[0].match.path"),
            Position {
                line: 5,
                column: 20
            }
        );
        assert_eq!(
            p.find("routes[1].require.providers[1]"),
            Position {
                line: 8,
                column: 25
            }
        );
        // Unknown paths fall back to the nearest ancestor.
        assert_eq!(
            p.find("routes[1].require.nothing"),
            p.find("routes[1].require")
        );
    }
}
