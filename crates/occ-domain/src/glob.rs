//! The patterns rules use for event types and zones: `*` stands for any run of characters
//! (`smoke.*`, `restricted_*`, `*`); everything else matches itself.

use std::fmt;

use serde::{Serialize, Serializer};

/// A compiled `*` pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Glob {
    pattern: String,
    /// The literal pieces between `*`s.
    parts: Vec<String>,
    anchored_start: bool,
    anchored_end: bool,
}

impl Glob {
    pub fn new(pattern: &str) -> Self {
        let parts: Vec<String> = pattern.split('*').map(str::to_owned).collect();
        Self {
            pattern: pattern.to_owned(),
            anchored_start: !pattern.starts_with('*'),
            anchored_end: !pattern.ends_with('*'),
            parts: parts.into_iter().filter(|p| !p.is_empty()).collect(),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.pattern
    }

    /// The pattern for SQL's `LIKE` (with its default escape, the backslash).
    pub fn to_like(&self) -> String {
        let mut like = String::with_capacity(self.pattern.len() + 4);
        for c in self.pattern.chars() {
            match c {
                '*' => like.push('%'),
                '%' | '_' | '\\' => {
                    like.push('\\');
                    like.push(c);
                }
                c => like.push(c),
            }
        }
        like
    }

    pub fn is_match(&self, text: &str) -> bool {
        if !self.pattern.contains('*') {
            return self.pattern == text;
        }
        let mut rest = text;
        let last = self.parts.len().saturating_sub(1);
        for (i, part) in self.parts.iter().enumerate() {
            if i == 0 && self.anchored_start {
                match rest.strip_prefix(part.as_str()) {
                    Some(r) => rest = r,
                    None => return false,
                }
            } else if i == last && self.anchored_end {
                return rest.ends_with(part.as_str());
            } else {
                match rest.find(part.as_str()) {
                    Some(at) => rest = &rest[at + part.len()..],
                    None => return false,
                }
            }
        }
        // Every literal part matched; an anchored end with no trailing literal needs the text
        // to be used up (only possible when the pattern had no `*` at all, handled above).
        true
    }
}

impl fmt::Display for Glob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.pattern)
    }
}

impl Serialize for Glob {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.pattern)
    }
}

#[cfg(test)]
mod tests {
    use super::Glob;
    use proptest::prelude::*;

    #[test]
    fn literals_match_exactly() {
        let g = Glob::new("smoke.detected");
        assert!(g.is_match("smoke.detected"));
        assert!(!g.is_match("smoke.detected.high"));
        assert!(!g.is_match("smoke"));
    }

    #[test]
    fn star_matches_any_run() {
        assert!(Glob::new("smoke.*").is_match("smoke.detected"));
        assert!(Glob::new("smoke.*").is_match("smoke.detected.dense"));
        assert!(!Glob::new("smoke.*").is_match("fire.detected"));
        assert!(Glob::new("*.detected").is_match("gas.detected"));
        assert!(!Glob::new("*.detected").is_match("gas.detected.low"));
        assert!(Glob::new("restricted_*").is_match("restricted_substation"));
        assert!(Glob::new("*").is_match(""));
        assert!(Glob::new("a*b*c").is_match("a--b--c"));
        assert!(!Glob::new("a*b*c").is_match("a--c--b"));
        assert!(Glob::new("a*a").is_match("aa"));
        assert!(!Glob::new("a*a").is_match("a"));
    }

    /// A reference matcher: the obvious recursive definition.
    fn reference(p: &[u8], t: &[u8]) -> bool {
        match p.split_first() {
            None => t.is_empty(),
            Some((b'*', rest)) => (0..=t.len()).any(|i| reference(rest, &t[i..])),
            Some((c, rest)) => t.first() == Some(c) && reference(rest, &t[1..]),
        }
    }

    proptest! {
        #[test]
        fn agrees_with_the_reference(p in "[ab*.]{0,8}", t in "[ab.]{0,10}") {
            prop_assert_eq!(Glob::new(&p).is_match(&t), reference(p.as_bytes(), t.as_bytes()));
        }
    }
}
