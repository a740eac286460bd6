//! A timing wheel of one deadline per target, in slots of one millisecond: the monitor's only clock.

use std::time::{Duration, Instant};

use super::monitor::{TargetId, TargetIndex};

/// A target's deadline on the [`Wheel`].
#[derive(Debug, Clone, Copy)]
pub(super) struct Entry {
    /// When it is due.
    pub(super) deadline: Instant,
    /// Whose it is.
    pub(super) id: TargetId,
    /// Where that target is in the monitor.
    pub(super) target: TargetIndex,
    /// The millisecond (since the wheel's origin) whose slot holds it.
    tick: u64,
}

/// Where a deadline sits on the [`Wheel`]: its slot, and its index there (which only moves, rarely, when the slot
/// is compacted with deadlines of later turns in it; then it is searched for).
#[derive(Debug, Clone, Copy)]
pub(super) struct Place {
    slot: usize,
    index: usize,
}

/// The deadlines of every target, one each, in slots of one millisecond on a wheel that spans at least twice the
/// horizon it is made for, a probe cycle (a deadline further out waits in its slot for later turns of the wheel).
///
/// A binary heap of 100,000 deadlines, rescheduled twice a cycle each, spends most of its time on cache misses; here
/// scheduling is a push onto the deadline's slot, cancelling marks the entry where it is (the target knows), and the
/// next deadline is cached, recomputed from the first slot with anything in it when it is taken or cancelled.
pub(super) struct Wheel {
    /// The instant of tick 0: the first deadline ever scheduled.
    origin: Option<Instant>,
    slots: Vec<Vec<Entry>>,
    /// `slots.len() - 1` (a power of two).
    mask: u64,
    /// Every tick before this one has been emptied of due entries; no entry's tick is earlier.
    cursor: u64,
    len: usize,
    /// The earliest deadline, unless `stale`; never later than it.
    next: Option<Instant>,
    stale: bool,
    /// When `stale` only because entries at `next` were cancelled, from this slot: where to look for another.
    hint: Option<usize>,
}

impl Wheel {
    /// The id of a cancelled or taken entry, left in its slot until the cursor passes it.
    const GONE: TargetId = TargetId::MIN;
    /// The fewest and most slots a wheel has.
    const SLOTS: (usize, usize) = (1 << 10, 1 << 16);

    /// Creates an empty wheel for deadlines mostly within `horizon` of the time they are scheduled.
    pub(super) fn new(horizon: Duration) -> Self {
        let wanted = usize::try_from(horizon.as_millis().saturating_mul(2)).unwrap_or(usize::MAX);
        let slots = wanted.clamp(Self::SLOTS.0, Self::SLOTS.1).next_power_of_two();
        Self {
            origin: None,
            slots: vec![Vec::new(); slots],
            mask: slots as u64 - 1,
            cursor: 0,
            len: 0,
            next: None,
            stale: false,
            hint: None,
        }
    }

    fn tick(origin: Instant, at: Instant) -> u64 {
        let since = at.saturating_duration_since(origin);
        since.as_secs().saturating_mul(1_000).saturating_add(u64::from(since.subsec_millis()))
    }

    fn slot(&self, tick: u64) -> usize {
        (tick & self.mask) as usize
    }

    /// Adds a deadline of target `id`, at `target` in the monitor; returns its place, which [`Wheel::cancel`] needs.
    pub(super) fn insert(&mut self, at: Instant, id: TargetId, target: TargetIndex) -> Place {
        let origin = *self.origin.get_or_insert(at);
        // A deadline already past is due at the next look, like any other in the cursor's tick.
        let tick = Self::tick(origin, at).max(self.cursor);
        let slot = self.slot(tick);
        let index = self.slots[slot].len();
        self.slots[slot].push(Entry { deadline: at, id, target, tick });
        self.len += 1;
        // Every other entry is at `next` or later, so an earlier one is the earliest, stale or not.
        if self.next.is_none_or(|next| at < next) {
            self.next = Some(at);
            self.stale = false;
            self.hint = None;
        }
        Place { slot, index }
    }

    /// Removes a target's deadline.
    pub(super) fn cancel(&mut self, place: Place, id: TargetId) {
        let slot = place.slot;
        let entries = &mut self.slots[slot];
        let index = if entries.get(place.index).is_some_and(|entry| entry.id == id) {
            place.index
        } else {
            let Some(index) = entries.iter().position(|entry| entry.id == id) else { return };
            index
        };
        let entry = entries[index];
        entries[index].id = Self::GONE;
        self.len -= 1;
        if self.next == Some(entry.deadline) {
            // Targets handled in one turn share their reply deadline: usually another is left at the same instant.
            self.hint = if self.stale && self.hint != Some(slot) { None } else { Some(slot) };
            self.stale = true;
        }
    }

    /// Moves into `due` the entries due at `now` of the earliest tick that has any, in (deadline, id) order;
    /// leaves it empty when nothing is due.
    pub(super) fn take_due(&mut self, now: Instant, due: &mut Vec<Entry>) {
        due.clear();
        let Some(origin) = self.origin else { return };
        let now_tick = Self::tick(origin, now);
        loop {
            let tick = self.cursor;
            let slot = self.slot(tick);
            let entries = &mut self.slots[slot];
            for entry in entries.iter_mut() {
                if entry.id != Self::GONE && entry.tick == tick && entry.deadline <= now {
                    due.push(*entry);
                    entry.id = Self::GONE;
                }
            }
            if !due.is_empty() {
                self.len -= due.len();
                self.stale = true;
                self.hint = None;
                due.sort_unstable_by_key(|entry| (entry.deadline, entry.id));
                return;
            }
            if tick >= now_tick {
                return;
            }
            // Passed: only deadlines of later turns are left (usually none).
            entries.retain(|entry| entry.id != Self::GONE);
            self.cursor += 1;
        }
    }

    /// Brings the cached next deadline up to date.
    pub(super) fn settle(&mut self) {
        if !self.stale {
            return;
        }
        let same = match (self.hint, self.next) {
            (Some(slot), Some(next)) => {
                self.slots[slot].iter().any(|entry| entry.id != Self::GONE && entry.deadline == next)
            }
            _ => false,
        };
        if !same {
            self.next = self.earliest();
        }
        self.stale = false;
        self.hint = None;
    }

    /// The earliest deadline as of the last [`Wheel::settle`].
    pub(super) fn next(&self) -> Option<Instant> {
        self.next
    }

    /// How many slots the wheel has.
    #[cfg(test)]
    pub(super) fn slot_count(&self) -> usize {
        self.slots.len()
    }

    fn earliest(&self) -> Option<Instant> {
        if self.len == 0 {
            return None;
        }
        for tick in self.cursor..=self.cursor + self.mask {
            let entries = &self.slots[self.slot(tick)];
            let earliest = entries
                .iter()
                .filter(|entry| entry.id != Self::GONE && entry.tick == tick)
                .map(|entry| entry.deadline)
                .min();
            if earliest.is_some() {
                return earliest;
            }
        }
        // Nothing within a turn of the wheel: only deadlines further out than its span.
        self.slots.iter().flatten().filter(|entry| entry.id != Self::GONE).map(|entry| entry.deadline).min()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeSet, HashMap};

    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    /// Takes everything due at `now`, tick by tick, as (offset from `base`, id), and settles.
    fn take_all(wheel: &mut Wheel, base: Instant, now: Instant) -> Vec<(Duration, TargetId)> {
        let mut due = Vec::new();
        let mut taken = Vec::new();
        loop {
            wheel.take_due(now, &mut due);
            if due.is_empty() {
                break;
            }
            taken.extend(due.iter().map(|entry| (entry.deadline - base, entry.id)));
        }
        wheel.settle();
        taken
    }

    #[test]
    fn an_empty_wheel_has_no_deadline_and_nothing_due() {
        let base = Instant::now();
        let mut wheel = Wheel::new(ms(500));
        assert_eq!(wheel.next(), None);
        assert_eq!(take_all(&mut wheel, base, base + ms(10_000)), []);
        assert_eq!(wheel.next(), None);

        // Emptied again by a cancel.
        let place = wheel.insert(base + ms(3), 1, 0);
        assert_eq!(wheel.next(), Some(base + ms(3)));
        wheel.cancel(place, 1);
        wheel.settle();
        assert_eq!((wheel.next(), wheel.len), (None, 0));
        assert_eq!(take_all(&mut wheel, base, base + ms(10_000)), []);
    }

    #[test]
    fn spans_twice_the_horizon_within_bounds() {
        assert_eq!(Wheel::new(Duration::ZERO).slot_count(), 1 << 10);
        assert_eq!(Wheel::new(ms(600)).slot_count(), 1 << 11);
        assert_eq!(Wheel::new(ms(1_000) + ms(100) + ms(80) * 5).slot_count(), 1 << 12, "the default cycle");
        assert_eq!(Wheel::new(Duration::from_secs(100)).slot_count(), 1 << 16);
        assert_eq!(Wheel::new(Duration::MAX).slot_count(), 1 << 16);
    }

    #[test]
    fn deadlines_are_taken_in_order_one_tick_at_a_time() {
        let base = Instant::now();
        let mut wheel = Wheel::new(ms(500));
        for (at, id) in [(ms(0), 0), (ms(5), 3), (us(2_500), 1), (us(2_200), 9), (us(2_500), 4), (ms(2), 7)] {
            wheel.insert(base + at, id, 0);
        }
        assert_eq!(wheel.next(), Some(base));
        let mut due = Vec::new();
        wheel.take_due(base + ms(10), &mut due);
        assert_eq!(due.iter().map(|entry| entry.id).collect::<Vec<_>>(), [0], "only the earliest tick");
        // Part of a tick: the rest of it stays, and is the next deadline.
        wheel.take_due(base + us(2_300), &mut due);
        assert_eq!(due.iter().map(|entry| entry.id).collect::<Vec<_>>(), [7, 9]);
        wheel.settle();
        assert_eq!(wheel.next(), Some(base + us(2_500)));
        // Equal deadlines in id order.
        assert_eq!(take_all(&mut wheel, base, base + ms(10)), [(us(2_500), 1), (us(2_500), 4), (ms(5), 3)]);
        assert_eq!((wheel.next(), wheel.len), (None, 0));
    }

    #[test]
    fn cancel_and_reschedule_move_the_next_deadline() {
        let base = Instant::now();
        let mut wheel = Wheel::new(ms(500));
        let a = wheel.insert(base + ms(10), 1, 0);
        let b = wheel.insert(base + ms(20), 2, 0);
        assert_eq!(wheel.next(), Some(base + ms(10)));
        wheel.cancel(a, 1);
        wheel.settle();
        assert_eq!(wheel.next(), Some(base + ms(20)));
        // Cancelling again, or with the wrong id, changes nothing.
        wheel.cancel(a, 1);
        wheel.cancel(b, 1);
        assert_eq!(wheel.len, 1);

        // Earlier: the next deadline at once, before any settle.
        wheel.cancel(b, 2);
        let b = wheel.insert(base + ms(5), 2, 0);
        assert_eq!(wheel.next(), Some(base + ms(5)));
        // Later.
        wheel.cancel(b, 2);
        wheel.insert(base + ms(30), 2, 0);
        wheel.settle();
        assert_eq!(wheel.next(), Some(base + ms(30)));
        assert_eq!(take_all(&mut wheel, base, base + ms(100)), [(ms(30), 2)]);
    }

    #[test]
    fn far_future_deadlines_wait_for_their_turn() {
        let base = Instant::now();
        let mut wheel = Wheel::new(ms(100));
        assert_eq!(wheel.slot_count(), 1024);
        wheel.insert(base, 1, 0);
        // In tick 7's slot, three turns of the wheel later.
        let far = ms(3 * 1024 + 7);
        wheel.insert(base + far, 2, 0);
        wheel.insert(base + ms(7), 3, 0);
        assert_eq!(take_all(&mut wheel, base, base + ms(100)), [(ms(0), 1), (ms(7), 3)]);
        assert_eq!(wheel.next(), Some(base + far), "found beyond a turn of the wheel");
        assert_eq!(take_all(&mut wheel, base, base + far - ms(1)), []);
        assert_eq!(take_all(&mut wheel, base, base + far), [(far, 2)]);
        assert_eq!(wheel.next(), None);
    }

    #[test]
    fn many_deadlines_in_one_slot() {
        let base = Instant::now();
        let mut wheel = Wheel::new(ms(100));
        wheel.insert(base, -1, 0);
        let places: Vec<Place> =
            (0..1_000).rev().map(|id| wheel.insert(base + ms(3) + us(id as u64 / 2), id, 0)).collect();
        // The same slot, a turn later: after the others, its index moves when the slot is compacted.
        let later = wheel.insert(base + ms(1_024 + 3), 5_000, 0);
        for (index, place) in places.iter().enumerate() {
            let id = 999 - index as TargetId;
            if id % 3 == 0 {
                wheel.cancel(*place, id);
            }
        }
        assert_eq!(wheel.len, 1 + 666 + 1);
        let taken = take_all(&mut wheel, base, base + ms(10));
        let expected: Vec<(Duration, TargetId)> = std::iter::once((ms(0), -1))
            .chain((0..1_000).filter(|id| id % 3 != 0).map(|id| (ms(3) + us(id as u64 / 2), id)))
            .collect();
        assert_eq!(taken, expected);
        assert_eq!(wheel.next(), Some(base + ms(1_024 + 3)));
        wheel.cancel(later, 5_000);
        wheel.settle();
        assert_eq!((wheel.next(), wheel.len), (None, 0));
    }

    /// Deadlines already past, and a `now` earlier than the last one: due at the next look, and nothing, respectively.
    #[test]
    fn past_deadlines_and_time_going_back() {
        let base = Instant::now();
        let mut wheel = Wheel::new(ms(500));
        wheel.insert(base + ms(1_000), 1, 0);
        // Before the first deadline ever scheduled (the wheel's origin).
        wheel.insert(base, 2, 0);
        assert_eq!(wheel.next(), Some(base));
        assert_eq!(take_all(&mut wheel, base, base), [(ms(0), 2)]);
        assert_eq!(take_all(&mut wheel, base, base + ms(2_000)), [(ms(1_000), 1)]);
        // Behind the ticks already passed.
        wheel.insert(base + ms(1_500), 3, 0);
        assert_eq!(wheel.next(), Some(base + ms(1_500)));
        assert_eq!(take_all(&mut wheel, base, base + ms(2_000)), [(ms(1_500), 3)]);
        // The clock goes back: nothing is due early, and nothing is lost.
        wheel.insert(base + ms(2_500), 4, 0);
        assert_eq!(take_all(&mut wheel, base, base + ms(500)), []);
        assert_eq!(take_all(&mut wheel, base, base + ms(2_499)), []);
        assert_eq!(wheel.next(), Some(base + ms(2_500)));
        assert_eq!(take_all(&mut wheel, base, base + ms(2_500)), [(ms(2_500), 4)]);
    }

    /// The wheel against a sorted set: the same next deadline after every change, and entries taken in order.
    #[test]
    fn agrees_with_a_sorted_set() {
        let mut rng = StdRng::seed_from_u64(19);
        let base = Instant::now();
        // A small span (1024 slots), so that deadlines up to 5 s out go round the wheel several times.
        let mut wheel = Wheel::new(ms(16));
        assert_eq!(wheel.slot_count(), 1024);
        let mut model: BTreeSet<(Instant, TargetId)> = BTreeSet::new();
        let mut slots: HashMap<TargetId, (Place, Instant)> = HashMap::new();
        let mut now = base;
        let mut due = Vec::new();
        let mut taken = 0;
        for _ in 0..20_000 {
            match rng.random_range(0..10) {
                0..5 => {
                    let id = rng.random_range(0..500);
                    // Half on whole milliseconds of a short range, so that many share a deadline.
                    let at = if rng.random_bool(0.5) {
                        now + Duration::from_micros(rng.random_range(0..5_000_000))
                    } else {
                        now + ms(rng.random_range(0..20))
                    };
                    if let Some((slot, old)) = slots.remove(&id) {
                        wheel.cancel(slot, id);
                        model.remove(&(old, id));
                    }
                    slots.insert(id, (wheel.insert(at, id, 0), at));
                    model.insert((at, id));
                }
                5 => {
                    let id = rng.random_range(0..500);
                    if let Some((slot, old)) = slots.remove(&id) {
                        wheel.cancel(slot, id);
                        model.remove(&(old, id));
                    }
                }
                _ => {
                    now += Duration::from_micros(rng.random_range(0..300_000));
                    loop {
                        wheel.take_due(now, &mut due);
                        if due.is_empty() {
                            break;
                        }
                        for entry in &due {
                            let first = model.pop_first().expect("the model has it too");
                            assert_eq!((entry.deadline, entry.id), first);
                            slots.remove(&entry.id);
                            taken += 1;
                        }
                    }
                    assert!(model.first().is_none_or(|&(at, _)| at > now), "everything due was taken");
                }
            }
            wheel.settle();
            assert_eq!(wheel.next(), model.first().map(|&(at, _)| at));
            assert_eq!(wheel.len, model.len());
        }
        assert!(taken > 1_000, "{taken}");
    }
}
