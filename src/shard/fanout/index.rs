//! The fan-out's indexes, so that a commit costs what it delivers, not what
//! the shard holds: the ring of encoded frames with the positions of each
//! type and stream (a subscriber finds its events without looking at the
//! others), and the waiting subscribers keyed by what they follow (a commit
//! wakes exactly those with a new matching event).
//!
//! Invariant: a registered (waiting) subscriber had no matching event in
//! `(its cursor, last]` when it registered; every matching event published
//! while it stays registered records the first such position (`woke_from`)
//! and wakes it. So on waking it may skip to `woke_from - 1`, or, woken for
//! another reason with no `woke_from`, to `last`: nothing it wants was
//! published in between. Positions in every list are ascending and all
//! within the ring.

use std::collections::{HashMap, HashSet, VecDeque};
use std::task::Waker;

/// One event, encoded once per shard.
pub struct Frame {
    pub position: u64,
    pub event_type: Box<str>,
    pub stream: Option<Box<str>>,
    /// `id: …\nevent: …\ndata: …\n\n`
    pub bytes: Box<[u8]>,
}

pub use crate::filter::{Filter, Pattern};

/// The keys the index finds a filter's events under: its streams when it
/// names some (the narrower keys), else each type; none: all.
fn keys(filter: &Filter) -> Vec<Key> {
    if filter.streams.is_empty() {
        filter.types.iter().cloned().map(Key::Type).collect()
    } else {
        filter.streams.iter().cloned().map(Key::Stream).collect()
    }
}

/// The prefixes whose position lists a filter reads.
fn prefixes(filter: &Filter) -> impl Iterator<Item = Key> {
    keys(filter).into_iter().filter(|k| {
        matches!(
            k,
            Key::Type(Pattern::Prefix(_)) | Key::Stream(Pattern::Prefix(_))
        )
    })
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    Type(Pattern),
    Stream(Pattern),
}

impl Key {
    fn matches(&self, f: &Frame) -> bool {
        match self {
            Key::Type(p) => p.matches(&f.event_type),
            Key::Stream(p) => f.stream.as_deref().is_some_and(|s| p.matches(s)),
        }
    }
}

/// The newest frames and, per key, the positions of those under it.
pub struct Ring {
    frames: VecDeque<Frame>,
    max: usize,
    /// Exact keys: every type and stream in the ring.
    exact: HashMap<Key, VecDeque<u64>>,
    /// Prefix keys that some subscriber reads (reference counted).
    prefixes: HashMap<Key, (usize, VecDeque<u64>)>,
}

impl Ring {
    pub fn new(max: usize) -> Ring {
        Ring {
            frames: VecDeque::with_capacity(max.min(4096)),
            max,
            exact: HashMap::new(),
            prefixes: HashMap::new(),
        }
    }

    pub fn first(&self) -> Option<u64> {
        self.frames.front().map(|f| f.position)
    }

    pub fn clear(&mut self) {
        self.frames.clear();
        self.exact.clear();
        for (_, list) in self.prefixes.values_mut() {
            list.clear();
        }
    }

    /// Append the next frame (its position one past the newest), dropping
    /// the oldest when full.
    pub fn push(&mut self, f: Frame) {
        if let Some(last) = self.frames.back() {
            assert_eq!(
                f.position,
                last.position + 1,
                "ring positions must be contiguous"
            );
        }
        if self.frames.len() == self.max {
            self.pop();
        }
        self.exact
            .entry(Key::Type(Pattern::Exact(f.event_type.clone())))
            .or_default()
            .push_back(f.position);
        if let Some(s) = &f.stream {
            self.exact
                .entry(Key::Stream(Pattern::Exact(s.clone())))
                .or_default()
                .push_back(f.position);
        }
        for (key, (_, list)) in self.prefixes.iter_mut() {
            if key.matches(&f) {
                list.push_back(f.position);
            }
        }
        self.frames.push_back(f);
    }

    fn pop(&mut self) {
        let Some(f) = self.frames.pop_front() else {
            return;
        };
        let drop_front = |key: Key, exact: &mut HashMap<Key, VecDeque<u64>>| {
            if let Some(list) = exact.get_mut(&key) {
                debug_assert_eq!(list.front(), Some(&f.position));
                list.pop_front();
                if list.is_empty() {
                    exact.remove(&key);
                }
            }
        };
        drop_front(
            Key::Type(Pattern::Exact(f.event_type.clone())),
            &mut self.exact,
        );
        if let Some(s) = &f.stream {
            drop_front(Key::Stream(Pattern::Exact(s.clone())), &mut self.exact);
        }
        for (_, list) in self.prefixes.values_mut() {
            if list.front() == Some(&f.position) {
                list.pop_front();
            }
        }
    }

    /// A subscriber with this filter starts reading: keep position lists
    /// for its prefixes (built from the ring the first time).
    pub fn add_reader(&mut self, filter: &Filter) {
        for key in prefixes(filter) {
            let frames = &self.frames;
            let entry = self.prefixes.entry(key.clone()).or_insert_with(|| {
                let list = frames
                    .iter()
                    .filter(|f| key.matches(f))
                    .map(|f| f.position)
                    .collect();
                (0, list)
            });
            entry.0 += 1;
        }
    }

    pub fn remove_reader(&mut self, filter: &Filter) {
        for key in prefixes(filter) {
            if let Some(e) = self.prefixes.get_mut(&key) {
                e.0 -= 1;
                if e.0 == 0 {
                    self.prefixes.remove(&key);
                }
            }
        }
    }

    fn list(&self, key: &Key) -> Option<&VecDeque<u64>> {
        match key {
            Key::Type(Pattern::Prefix(_)) | Key::Stream(Pattern::Prefix(_)) => {
                self.prefixes.get(key).map(|(_, l)| l)
            }
            _ => self.exact.get(key),
        }
    }

    fn frame(&self, position: u64) -> &Frame {
        let first = self
            .frames
            .front()
            .expect("a position in the ring")
            .position;
        &self.frames[(position - first) as usize]
    }

    /// Visit the frames after `after` that `filter` wants, in order, at
    /// most `max`; returns the last position looked at (`after` when none).
    /// The cost follows the frames under the filter's keys, not the ring.
    pub fn each_match(
        &self,
        filter: &Filter,
        after: u64,
        max: usize,
        mut visit: impl FnMut(&Frame),
    ) -> u64 {
        let keys = keys(filter);
        let mut last = after;
        let mut taken = 0;
        if keys.is_empty() {
            let Some(first) = self.first() else {
                return after;
            };
            let from = after.saturating_add(1).max(first);
            // A cursor past the newest frame (cluster mode: a Last-Event-ID
            // this node has not applied yet) has nothing here yet.
            let Some(skip) = usize::try_from(from - first)
                .ok()
                .filter(|n| *n <= self.frames.len())
            else {
                return after;
            };
            for f in self.frames.range(skip..) {
                if taken == max {
                    break;
                }
                visit(f);
                taken += 1;
                last = f.position;
            }
            return last;
        }
        // Several sorted lists (one per key), merged without repeats.
        let mut cursors: Vec<(&VecDeque<u64>, usize)> = keys
            .iter()
            .filter_map(|k| self.list(k))
            .map(|l| (l, l.partition_point(|p| *p <= after)))
            .collect();
        while taken < max {
            let Some(next) = cursors.iter().filter_map(|(l, i)| l.get(*i).copied()).min() else {
                break;
            };
            for (l, i) in cursors.iter_mut() {
                if l.get(*i) == Some(&next) {
                    *i += 1;
                }
            }
            let f = self.frame(next);
            last = next;
            if filter.matches(&f.event_type, f.stream.as_deref()) {
                visit(f);
                taken += 1;
            }
        }
        last
    }

    /// Whether a frame after `after` may be wanted (the narrow check a
    /// subscriber makes before it waits).
    pub fn has_match(&self, filter: &Filter, after: u64) -> bool {
        let mut any = false;
        self.each_match(filter, after, 1, |_| any = true);
        any
    }
}

/// The subscribers waiting for events, by what they follow.
#[derive(Default)]
pub struct Waiters {
    /// Registered subscribers: their waker and keys.
    wakers: HashMap<u64, (Waker, Vec<Key>)>,
    /// The first matching position published since each woken subscriber
    /// registered.
    woke_from: HashMap<u64, u64>,
    all: HashSet<u64>,
    exact: HashMap<Key, HashSet<u64>>,
    prefixes: HashMap<Key, HashSet<u64>>,
    /// Token subscribers whose token has expired, until they leave.
    expired: HashSet<u64>,
}

impl Waiters {
    /// Wait (or keep waiting) with this waker.
    pub fn register(&mut self, id: u64, filter: &Filter, waker: &Waker) {
        if let Some((w, _)) = self.wakers.get_mut(&id) {
            if !w.will_wake(waker) {
                *w = waker.clone();
            }
            return;
        }
        let keys = keys(filter);
        if keys.is_empty() {
            self.all.insert(id);
        }
        for k in &keys {
            self.set(k).insert(id);
        }
        self.wakers.insert(id, (waker.clone(), keys));
    }

    fn set(&mut self, k: &Key) -> &mut HashSet<u64> {
        match k {
            Key::Type(Pattern::Prefix(_)) | Key::Stream(Pattern::Prefix(_)) => {
                self.prefixes.entry(k.clone()).or_default()
            }
            _ => self.exact.entry(k.clone()).or_default(),
        }
    }

    /// Stop waiting; the first matching position published meanwhile.
    pub fn unregister(&mut self, id: u64) -> Option<u64> {
        if let Some((_, keys)) = self.wakers.remove(&id) {
            if keys.is_empty() {
                self.all.remove(&id);
            }
            for k in &keys {
                let set = self.set(k);
                set.remove(&id);
                if set.is_empty() {
                    self.exact.remove(k);
                    self.prefixes.remove(k);
                }
            }
        }
        self.woke_from.remove(&id)
    }

    /// A frame was published: wake every registered subscriber it matches
    /// (each once until it runs). The cost follows who is woken.
    pub fn publish(&mut self, f: &Frame) {
        let mut woken = std::mem::take(&mut self.all);
        for key in [
            Some(Key::Type(Pattern::Exact(f.event_type.clone()))),
            f.stream.clone().map(|s| Key::Stream(Pattern::Exact(s))),
        ]
        .into_iter()
        .flatten()
        {
            if let Some(set) = self.exact.remove(&key) {
                woken.extend(set);
            }
        }
        if !self.prefixes.is_empty() {
            let hit: Vec<Key> = self
                .prefixes
                .keys()
                .filter(|k| k.matches(f))
                .cloned()
                .collect();
            for k in hit {
                woken.extend(self.prefixes.remove(&k).unwrap_or_default());
            }
        }
        for id in woken {
            // Taken out of one key's set; its other keys may still name it,
            // and `woke_from` keeps the earliest position.
            if let Some((w, _)) = self.wakers.get(&id) {
                if let std::collections::hash_map::Entry::Vacant(e) = self.woke_from.entry(id) {
                    e.insert(f.position);
                    w.wake_by_ref();
                }
            }
        }
    }

    /// Wake everyone (heartbeat, close); registrations stay.
    pub fn wake_all(&self) {
        for (w, _) in self.wakers.values() {
            w.wake_by_ref();
        }
    }

    /// A subscriber's token expired: note it and wake it if it waits (one
    /// that is not waiting checks the clock before it waits again).
    pub fn expire(&mut self, id: u64) {
        self.expired.insert(id);
        if let Some((w, _)) = self.wakers.get(&id) {
            w.wake_by_ref();
        }
    }

    /// The subscriber is gone: out of the index and of every set.
    pub fn leave(&mut self, id: u64) {
        self.unregister(id);
        self.expired.remove(&id);
    }

    /// Whether `expire` was called for this subscriber.
    pub fn expired(&self, id: u64) -> bool {
        self.expired.contains(&id)
    }

    pub fn woken(&self, id: u64) -> bool {
        self.woke_from.contains_key(&id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::task::Wake;

    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
        fn wake_by_ref(self: &Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn waker() -> (Arc<Count>, Waker) {
        let c = Arc::new(Count(AtomicUsize::new(0)));
        (c.clone(), Waker::from(c))
    }

    fn frame(position: u64, t: &str, stream: Option<&str>) -> Frame {
        Frame {
            position,
            event_type: t.into(),
            stream: stream.map(Into::into),
            bytes: format!("{position}").into_bytes().into(),
        }
    }

    fn filter(types: &[&str], stream: Option<&str>) -> Filter {
        Filter {
            types: types.iter().map(|t| Pattern::parse(t).unwrap()).collect(),
            streams: stream
                .map(|s| Pattern::parse(s).unwrap())
                .into_iter()
                .collect(),
        }
    }

    fn matches(ring: &Ring, f: &Filter, after: u64) -> Vec<u64> {
        let mut v = Vec::new();
        ring.each_match(f, after, usize::MAX, |fr| v.push(fr.position));
        v
    }

    /// Cluster mode: a subscriber's cursor may be past the ring's newest
    /// frame (a Last-Event-ID from a node further along). Nothing is after
    /// it yet, for any filter, and asking must not panic.
    #[test]
    fn a_cursor_past_the_newest_frame_finds_nothing_yet() {
        let mut ring = Ring::new(8);
        let typed = filter(&["a"], None);
        ring.add_reader(&typed);
        for p in 1..=3 {
            ring.push(frame(p, "a", None));
        }
        for after in [3, 4, 10, u64::MAX - 1, u64::MAX] {
            assert_eq!(matches(&ring, &filter(&[], None), after), Vec::<u64>::new());
            assert_eq!(matches(&ring, &typed, after), Vec::<u64>::new());
            assert!(!ring.has_match(&filter(&[], None), after));
        }
        ring.push(frame(4, "a", None));
        ring.push(frame(5, "a", None));
        assert_eq!(matches(&ring, &filter(&[], None), 4), vec![5]);
    }

    #[test]
    fn the_ring_finds_each_filters_events_by_key() {
        let mut ring = Ring::new(8);
        let pre = filter(&["order.*"], None);
        ring.add_reader(&pre);
        let evs = [
            ("order.placed", Some("o1")),
            ("user.created", None),
            ("order.paid", Some("o1")),
            ("order.placed", Some("o2")),
            ("user.deleted", Some("u1")),
        ];
        for (i, (t, s)) in evs.iter().enumerate() {
            ring.push(frame(i as u64 + 1, t, *s));
        }
        assert_eq!(matches(&ring, &filter(&[], None), 0), vec![1, 2, 3, 4, 5]);
        assert_eq!(
            matches(&ring, &filter(&["order.placed"], None), 0),
            vec![1, 4]
        );
        assert_eq!(
            matches(&ring, &filter(&["order.placed", "user.created"], None), 1),
            vec![2, 4]
        );
        assert_eq!(matches(&ring, &pre, 0), vec![1, 3, 4]);
        // Exact and prefix overlapping: each event once.
        ring.add_reader(&filter(&["order.*", "order.paid"], None));
        assert_eq!(
            matches(&ring, &filter(&["order.*", "order.paid"], None), 0),
            vec![1, 3, 4]
        );
        assert_eq!(matches(&ring, &filter(&[], Some("o1")), 0), vec![1, 3]);
        assert_eq!(
            matches(&ring, &filter(&["order.paid"], Some("o1")), 0),
            vec![3]
        );
        let sp = filter(&[], Some("o*"));
        ring.add_reader(&sp);
        assert_eq!(matches(&ring, &sp, 0), vec![1, 3, 4]);
        // The ring drops its oldest; the lists follow.
        for p in 6..=12 {
            ring.push(frame(p, "user.created", None));
        }
        assert_eq!(ring.first(), Some(5));
        assert_eq!(matches(&ring, &pre, 0), Vec::<u64>::new());
        assert_eq!(
            matches(&ring, &filter(&["user.*"], None), 0),
            Vec::<u64>::new(),
            "no reader: no list"
        );
        assert_eq!(
            matches(&ring, &filter(&["user.created"], None), 0),
            (6..=12).collect::<Vec<_>>()
        );
        assert!(!ring.has_match(&pre, 4));
        ring.push(frame(13, "order.shipped", None));
        assert!(ring.has_match(&pre, 4));
        assert_eq!(
            matches(&ring, &filter(&["user.created"], None), 10),
            vec![11, 12]
        );
        // A prefix's list goes with its last reader.
        ring.remove_reader(&pre);
        ring.remove_reader(&filter(&["order.*", "order.paid"], None));
        assert!(ring
            .prefixes
            .keys()
            .all(|k| *k != Key::Type(Pattern::Prefix("order.".into()))));
    }

    #[test]
    fn a_commit_wakes_exactly_the_subscribers_it_matches() {
        let mut w = Waiters::default();
        let subs = [
            (1, filter(&[], None)),
            (2, filter(&["a"], None)),
            (3, filter(&["b", "c"], None)),
            (4, filter(&["x.*"], None)),
            (5, filter(&["a"], Some("s1"))),
        ];
        let counts: Vec<_> = subs
            .iter()
            .map(|(id, f)| {
                let (c, wk) = waker();
                w.register(*id, f, &wk);
                c
            })
            .collect();
        let woken = |counts: &[Arc<Count>]| -> Vec<usize> {
            counts.iter().map(|c| c.0.load(Ordering::Relaxed)).collect()
        };
        w.publish(&frame(10, "b", None));
        assert_eq!(woken(&counts), vec![1, 0, 1, 0, 0]);
        w.publish(&frame(11, "c", None));
        assert_eq!(woken(&counts), vec![1, 0, 1, 0, 0], "once until it runs");
        assert_eq!(w.unregister(3), Some(10), "from the first match");
        w.publish(&frame(12, "x.y", Some("s1")));
        assert_eq!(woken(&counts), vec![1, 0, 1, 1, 1]);
        w.publish(&frame(13, "zzz", None));
        assert_eq!(woken(&counts), vec![1, 0, 1, 1, 1], "nobody follows zzz");
        assert_eq!(w.unregister(2), None, "a quiet type: never woken");
        assert_eq!(w.unregister(1), Some(10));
        assert_eq!(w.unregister(4), Some(12));
        assert_eq!(w.unregister(5), Some(12));
        assert!(
            w.wakers.is_empty() && w.exact.is_empty() && w.prefixes.is_empty() && w.all.is_empty()
        );
    }

    #[test]
    fn heartbeats_wake_without_unregistering() {
        let mut w = Waiters::default();
        let (c, wk) = waker();
        w.register(7, &filter(&["a"], None), &wk);
        w.wake_all();
        assert_eq!(c.0.load(Ordering::Relaxed), 1);
        assert!(!w.woken(7));
        w.publish(&frame(3, "a", None));
        assert!(w.woken(7));
        assert_eq!(w.unregister(7), Some(3));
    }
}
