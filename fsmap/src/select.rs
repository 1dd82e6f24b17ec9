//! Copy criteria: which changed files a copy takes (`--include`,
//! `--exclude`, `--min-size`, `--max-size`), and the copy set they make
//! with the filesystem metadata that changed.

use crate::diff::{ChangeKind, FileChange, FsChanges};
use crate::runs::merge_runs;

/// Patterns one selection holds.
pub const PATTERNS_MAX: usize = 1024;
const PATTERN_BYTES_MAX: usize = 1024;
const DOUBLE_STARS_MAX: usize = 4;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Criteria {
    /// Globs a file must match (any of them); empty: every file.
    pub include: Vec<String>,
    /// Globs that drop a file even when included.
    pub exclude: Vec<String>,
    pub min_size_bytes: Option<u64>,
    pub max_size_bytes: Option<u64>,
}

impl Criteria {
    pub fn is_empty(&self) -> bool {
        *self == Criteria::default()
    }

    /// Whether the change is selected: deletions never are (nothing to
    /// copy), directories never are (their blocks are metadata, always
    /// copied).
    pub fn selects(&self, change: &FileChange) -> bool {
        change.kind != ChangeKind::Deleted && !change.is_directory && self.matches(change)
    }

    /// Whether the change's paths and size meet the criteria, whatever
    /// its kind (for listing).
    pub fn matches(&self, change: &FileChange) -> bool {
        if self
            .min_size_bytes
            .is_some_and(|min| change.size_bytes < min)
            || self
                .max_size_bytes
                .is_some_and(|max| change.size_bytes > max)
        {
            return false;
        }
        let any_path = |patterns: &[String]| {
            change
                .paths
                .iter()
                .any(|path| patterns.iter().any(|p| path_matches(p, path)))
        };
        (self.include.is_empty() || any_path(&self.include)) && !any_path(&self.exclude)
    }
}

/// Checks patterns before use: bounded in number, length and `**`
/// count, so matching stays cheap.
pub fn validate(criteria: &Criteria) -> Result<(), String> {
    let patterns = criteria.include.iter().chain(&criteria.exclude);
    if criteria.include.len() + criteria.exclude.len() > PATTERNS_MAX {
        return Err(format!("at most {PATTERNS_MAX} patterns"));
    }
    for pattern in patterns {
        if pattern.is_empty() || pattern.len() > PATTERN_BYTES_MAX {
            return Err(format!(
                "pattern {pattern:?}: empty or longer than {PATTERN_BYTES_MAX} bytes"
            ));
        }
        if pattern.matches("**").count() > DOUBLE_STARS_MAX {
            return Err(format!(
                "pattern {pattern:?}: more than {DOUBLE_STARS_MAX} '**'"
            ));
        }
    }
    Ok(())
}

/// The blocks (start, count) a copy of `changes` under `criteria` takes:
/// the selected files' changed blocks and every changed metadata block
/// (so the copy's filesystem stays consistent).
pub fn copy_blocks(changes: &FsChanges, criteria: &Criteria) -> Vec<(u64, u64)> {
    let mut runs = changes.metadata_runs.clone();
    for change in changes.files.iter().filter(|c| criteria.selects(c)) {
        runs.extend_from_slice(&change.changed_blocks);
    }
    merge_runs(runs)
}

/// A pattern without '/' matches the file name in any directory; one with
/// '/' matches the whole path ("/" at the start optional). `*` and `?`
/// stay within one path component, `**` crosses them, `[abc]`/`[a-z]`/
/// `[!a]` match one character.
pub fn path_matches(pattern: &str, path: &str) -> bool {
    if pattern.contains('/') {
        let pattern = pattern.trim_start_matches('/');
        glob(pattern.as_bytes(), path.trim_start_matches('/').as_bytes())
    } else {
        let name = path.rsplit('/').next().unwrap_or(path);
        glob(pattern.as_bytes(), name.as_bytes())
    }
}

fn glob(pattern: &[u8], text: &[u8]) -> bool {
    // Iterative with one backtrack point per star kind keeps this linear
    // enough for paths; patterns are bounded by PATTERNS_MAX and length.
    match pattern.first() {
        None => text.is_empty(),
        Some(b'*') if pattern.get(1) == Some(&b'*') => {
            let rest = pattern[2..].strip_prefix(b"/").unwrap_or(&pattern[2..]);
            (0..=text.len()).any(|skip| {
                (skip == 0 || text[skip - 1] == b'/' || rest.is_empty())
                    && glob(rest, &text[skip..])
            }) || (0..=text.len()).any(|skip| glob(&pattern[2..], &text[skip..]))
        }
        Some(b'*') => {
            let mut skip = 0;
            loop {
                if glob(&pattern[1..], &text[skip..]) {
                    return true;
                }
                if skip == text.len() || text[skip] == b'/' {
                    return false;
                }
                skip += 1;
            }
        }
        Some(b'?') => text.first().is_some_and(|&c| c != b'/') && glob(&pattern[1..], &text[1..]),
        Some(b'[') => match (
            class_match(&pattern[1..], text.first().copied()),
            text.first(),
        ) {
            (Some((true, used)), Some(_)) => glob(&pattern[1 + used..], &text[1..]),
            (Some((false, _)), _) | (_, None) => false,
            (None, Some(&c)) => c == b'[' && glob(&pattern[1..], &text[1..]),
        },
        Some(&c) => text.first() == Some(&c) && glob(&pattern[1..], &text[1..]),
    }
}

/// Matches `c` against a class body (after '['); returns (matched, bytes
/// of pattern used including ']'), or None when the class never closes.
fn class_match(body: &[u8], c: Option<u8>) -> Option<(bool, usize)> {
    let negated = matches!(body.first(), Some(b'!' | b'^'));
    let start = usize::from(negated);
    let close = body.iter().skip(start + 1).position(|&b| b == b']')? + start + 1;
    let set = &body[start..close];
    let c = c?;
    let mut matched = false;
    let mut index = 0;
    while index < set.len() {
        if index + 2 < set.len() && set[index + 1] == b'-' {
            matched |= (set[index]..=set[index + 2]).contains(&c);
            index += 3;
        } else {
            matched |= set[index] == c;
            index += 1;
        }
    }
    Some((matched != negated, close + 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_names_paths_and_classes() {
        let cases = [
            ("*.txt", "/a/b/notes.txt", true),
            ("*.txt", "/a/b/notes.txt.bak", false),
            ("notes.???", "/x/notes.txt", true),
            ("/a/*/notes.txt", "/a/b/notes.txt", true),
            ("/a/*/notes.txt", "/a/b/c/notes.txt", false),
            ("/a/**/notes.txt", "/a/b/c/notes.txt", true),
            ("/a/**/notes.txt", "/a/notes.txt", true),
            ("a/**", "/a/b/c", true),
            ("/var/log/**", "/var/lib/x", false),
            ("[a-c]*.log", "/b1.log", true),
            ("[!a-c]*.log", "/b1.log", false),
            ("[xyz].txt", "/y.txt", true),
            ("[unclosed", "/[unclosed", true),
            ("*", "/anything", true),
        ];
        for (pattern, path, expected) in cases {
            assert_eq!(path_matches(pattern, path), expected, "{pattern} vs {path}");
        }
    }

    #[test]
    fn criteria_select_by_size_and_never_deletions_or_directories() {
        let change = |kind, size_bytes, is_directory| FileChange {
            kind,
            inode: 12,
            paths: vec!["/data/big.db".into()],
            old_paths: Vec::new(),
            content_changed: true,
            is_directory,
            size_bytes,
            changed_bytes: 4096,
            changed_blocks: vec![(100, 1)],
            changed_file_ranges: vec![(0, 4096)],
        };
        let criteria = Criteria {
            include: vec!["*.db".into()],
            exclude: vec!["/tmp/**".into()],
            min_size_bytes: Some(1000),
            max_size_bytes: Some(1 << 20),
        };
        assert!(criteria.selects(&change(ChangeKind::Modified, 5000, false)));
        assert!(!criteria.selects(&change(ChangeKind::Modified, 10, false)));
        assert!(!criteria.selects(&change(ChangeKind::Modified, 2 << 20, false)));
        assert!(!criteria.selects(&change(ChangeKind::Deleted, 5000, false)));
        assert!(!criteria.selects(&change(ChangeKind::Modified, 5000, true)));
    }
}
