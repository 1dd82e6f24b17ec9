//! The one seeded generator the tests use, so that any failure reproduces
//! from the seed it printed, and the data they write with it.

/// The state `Xorshift::new` starts from for seed 0, which xorshift cannot
/// leave (every step of 0 gives 0).
const ZERO_SEED_STATE: u64 = 0x9E37_79B9_7F4A_7C15;

/// Marsaglia's xorshift64 (shifts 13, 7, 17): fast, and plenty for
/// choosing offsets, mutations and file contents. Not for anything that
/// must be unpredictable.
///
/// `Xorshift(state)` starts from a raw state, which must not be 0;
/// `Xorshift::new` takes any seed.
#[derive(Debug, Clone)]
pub struct Xorshift(pub u64);

impl Xorshift {
    /// A generator whose numbers depend on every bit of `seed`: different
    /// seeds give different sequences.
    pub fn new(seed: u64) -> Xorshift {
        Xorshift(if seed == 0 { ZERO_SEED_STATE } else { seed })
    }

    /// The next number. Not `Iterator::next`: the sequence never ends, so
    /// an `Option` would only be unwrapped at every call.
    #[expect(
        clippy::should_implement_trait,
        reason = "an endless generator; every caller wants the number itself"
    )]
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A number below `bound` (0 when `bound` is 0).
    pub fn below(&mut self, bound: u64) -> u64 {
        self.next() % bound.max(1)
    }

    /// An index into something of `length` items (0 when it is empty).
    pub fn index(&mut self, length: usize) -> usize {
        self.below(length as u64) as usize
    }

    /// One of `choices`, each as likely as the others.
    pub fn pick<T: Copy>(&mut self, choices: &[T]) -> T {
        choices[self.index(choices.len())]
    }

    /// True `percent` times in a hundred.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    /// `length` bytes, one per step (the low byte of each number).
    pub fn bytes(&mut self, length: usize) -> Vec<u8> {
        (0..length).map(|_| self.next() as u8).collect()
    }
}

/// `length` deterministic bytes from `seed`: the contents of a test file
/// or image, the same on every run.
pub fn random_bytes(seed: u64, length: usize) -> Vec<u8> {
    Xorshift::new(seed).bytes(length)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first numbers of state 1, computed apart from this code, so
    /// that a change to the generator (which would change every seeded
    /// test's cases) cannot pass unnoticed.
    #[test]
    fn xorshift64_from_state_1_gives_marsaglias_sequence() {
        let mut random = Xorshift(1);
        assert_eq!(random.next(), 0x4082_2041);
        assert_eq!(random.next(), 0x1000_4106_0C01_1441);
        assert_eq!(random.next(), 0x9B1E_842F_6E86_2629);
    }

    #[test]
    fn seeds_differing_in_one_bit_give_different_sequences() {
        for seed in [0u64, 2, 300, 1 << 63] {
            assert_ne!(
                random_bytes(seed, 64),
                random_bytes(seed ^ 1, 64),
                "seeds {seed} and {}",
                seed ^ 1
            );
        }
    }

    #[test]
    fn below_stays_below_its_bound_and_tolerates_zero() {
        let mut random = Xorshift::new(7);
        for bound in [1u64, 2, 3, 10, 1000] {
            assert!((0..100).all(|_| random.below(bound) < bound));
        }
        assert_eq!(random.below(0), 0);
        assert_eq!(random.index(0), 0);
    }

    #[test]
    fn pick_returns_only_the_choices_and_reaches_every_one() {
        let mut random = Xorshift::new(11);
        let choices = [3u8, 5, 7];
        let picked: Vec<u8> = (0..300).map(|_| random.pick(&choices)).collect();
        assert!(picked.iter().all(|p| choices.contains(p)), "{picked:?}");
        assert!(choices.iter().all(|c| picked.contains(c)), "{picked:?}");
    }
}
