//! What a reader asks for, in one small language shared by subscription
//! filters (`types=order.*&stream=cart-7`), subscription tokens' scopes
//! (`"types": ["order.*"], "streams": ["user-42:*"]`) and scoped reads:
//! a name, or every name starting with a prefix (`order.*`).
//!
//! A `Filter` wants an event when its type matches one of `types` (any type
//! when empty) and its stream matches one of `streams` (any event, with a
//! stream or none, when empty). A token's scope is a `Filter` too; a
//! request's filter must lie within it (`Filter::within`), and what is then
//! served is the narrower of the two (`Filter::narrowed`), so an event outside
//! the scope is never matched, whatever the request asked.

/// A type or stream name, or every name starting with a prefix (`order.*`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Pattern {
    Exact(Box<str>),
    Prefix(Box<str>),
}

impl Pattern {
    /// `name`, or `prefix*`; a `*` anywhere else is refused.
    pub fn parse(s: &str) -> Result<Pattern, String> {
        match s.find('*') {
            None => Ok(Pattern::Exact(s.into())),
            Some(i) if i == s.len() - 1 => Ok(Pattern::Prefix(s[..i].into())),
            Some(_) => Err(format!("{s:?}: '*' may only end a pattern (as in order.*)")),
        }
    }

    pub fn matches(&self, name: &str) -> bool {
        match self {
            Pattern::Exact(n) => **n == *name,
            Pattern::Prefix(p) => name.starts_with(&**p),
        }
    }

    /// Whether every name `other` matches, this matches too.
    pub fn covers(&self, other: &Pattern) -> bool {
        match (self, other) {
            (Pattern::Exact(a), Pattern::Exact(b)) => a == b,
            (Pattern::Prefix(p), Pattern::Exact(n) | Pattern::Prefix(n)) => n.starts_with(&**p),
            // A name never covers the many names of a prefix.
            (Pattern::Exact(_), Pattern::Prefix(_)) => false,
        }
    }
}

impl std::fmt::Display for Pattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Pattern::Exact(n) => f.write_str(n),
            Pattern::Prefix(p) => write!(f, "{p}*"),
        }
    }
}

/// Which events a reader wants: any of `types` (all when empty), in any of
/// `streams` (any, with a stream or without, when empty).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    pub types: Vec<Pattern>,
    pub streams: Vec<Pattern>,
}

/// Which part of a filter lies outside a scope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outside {
    Types,
    Streams,
}

impl Filter {
    pub fn matches(&self, event_type: &str, stream: Option<&str>) -> bool {
        (self.types.is_empty() || self.types.iter().any(|t| t.matches(event_type)))
            && (self.streams.is_empty()
                || stream.is_some_and(|s| self.streams.iter().any(|p| p.matches(s))))
    }

    /// Whether a request's filter lies within `scope`: each pattern it gives
    /// is covered by one of the scope's, on each side the scope restricts.
    /// A side the request leaves empty asks for "all of the scope's"
    /// (`narrowed` fills it in), so it is always within.
    pub fn within(&self, scope: &Filter) -> Result<(), Outside> {
        let side = |mine: &[Pattern], theirs: &[Pattern]| {
            theirs.is_empty() || mine.iter().all(|m| theirs.iter().any(|t| t.covers(m)))
        };
        if !side(&self.types, &scope.types) {
            return Err(Outside::Types);
        }
        if !side(&self.streams, &scope.streams) {
            return Err(Outside::Streams);
        }
        Ok(())
    }

    /// What a request asked (`self`) served within `scope`: on each side,
    /// the request's patterns when it gave some (they lie within the scope:
    /// `within` said so), else the scope's. Matches exactly the events both
    /// match.
    pub fn narrowed(self, scope: &Filter) -> Filter {
        debug_assert!(self.within(scope).is_ok(), "narrowed only within the scope");
        let pick = |mine: Vec<Pattern>, theirs: &[Pattern]| {
            if mine.is_empty() {
                theirs.to_vec()
            } else {
                mine
            }
        };
        Filter {
            types: pick(self.types, &scope.types),
            streams: pick(self.streams, &scope.streams),
        }
    }

    /// The patterns of one side, for messages: `order.*, user.created`.
    pub fn describe(patterns: &[Pattern]) -> String {
        patterns
            .iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Pattern {
        Pattern::parse(s).unwrap()
    }

    fn f(types: &[&str], streams: &[&str]) -> Filter {
        Filter {
            types: types.iter().map(|t| p(t)).collect(),
            streams: streams.iter().map(|s| p(s)).collect(),
        }
    }

    #[test]
    fn patterns() {
        assert_eq!(p("a.b"), Pattern::Exact("a.b".into()));
        assert_eq!(p("order.*"), Pattern::Prefix("order.".into()));
        assert_eq!(p("*"), Pattern::Prefix("".into()));
        assert!(Pattern::parse("or*der").is_err());
        assert!(Pattern::parse("**").is_err());
        assert!(p("order.*").matches("order.placed"));
        assert!(!p("order.*").matches("orders"));
        assert_eq!(p("order.*").to_string(), "order.*");
    }

    #[test]
    fn covering() {
        assert!(p("a").covers(&p("a")));
        assert!(!p("a").covers(&p("b")));
        assert!(p("a.*").covers(&p("a.b")));
        assert!(p("a.*").covers(&p("a.b.*")));
        assert!(p("a.*").covers(&p("a.*")));
        assert!(!p("a.b.*").covers(&p("a.*")));
        assert!(!p("a").covers(&p("a*")));
        assert!(p("*").covers(&p("anything*")));
        assert!(!p("user-4*").covers(&p("user-*")));
    }

    #[test]
    fn within_and_narrowed() {
        let scope = f(&["order.*", "chat"], &["user-42:*"]);
        // No filter: everything in the scope.
        assert_eq!(Filter::default().within(&scope), Ok(()));
        let n = Filter::default().narrowed(&scope);
        assert_eq!(n, scope);
        // Inside on both sides.
        let req = f(&["order.placed"], &["user-42:cart"]);
        assert_eq!(req.within(&scope), Ok(()));
        assert_eq!(req.clone().narrowed(&scope), req);
        // A type outside; a stream outside; a wider prefix.
        assert_eq!(
            f(&["user.created"], &[]).within(&scope),
            Err(Outside::Types)
        );
        assert_eq!(
            f(&["chat"], &["user-43:x"]).within(&scope),
            Err(Outside::Streams)
        );
        assert_eq!(f(&["*"], &[]).within(&scope), Err(Outside::Types));
        // Only types given: the streams come from the scope.
        let n = f(&["chat"], &[]).narrowed(&scope);
        assert_eq!(n, f(&["chat"], &["user-42:*"]));
        assert!(n.matches("chat", Some("user-42:room")));
        assert!(!n.matches("chat", Some("user-43:room")));
        assert!(!n.matches("chat", None));
        // A scope on one side leaves the other free.
        let types_only = f(&["order.*"], &[]);
        assert_eq!(f(&["order.x"], &["any"]).within(&types_only), Ok(()));
        let n = Filter::default().narrowed(&types_only);
        assert!(n.matches("order.x", None));
        assert!(!n.matches("chat", None));
    }

    #[test]
    fn several_streams_match_any() {
        let m = f(&[], &["a", "b-*"]);
        assert!(m.matches("t", Some("a")));
        assert!(m.matches("t", Some("b-1")));
        assert!(!m.matches("t", Some("c")));
        assert!(!m.matches("t", None));
        assert!(f(&[], &[]).matches("t", None));
    }
}
