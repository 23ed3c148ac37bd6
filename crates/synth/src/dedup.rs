//! Duplicate removal: exact (sha256 of the case- and whitespace-folded text) and near
//! (MinHash signatures of word 3-shingles, Broder 1997, indexed by locality-sensitive hashing
//! in bands, Leskovec, Rajaraman & Ullman, *Mining of Massive Datasets* ch. 3; a candidate
//! pair from the index is confirmed by its estimated Jaccard similarity).

use std::collections::{HashMap, HashSet};

use sha2::{Digest, Sha256};

/// Hash functions per signature.
const PERMUTATIONS: usize = 128;
/// LSH bands (of `PERMUTATIONS / BANDS` rows each): with 32 bands of 4 rows, pairs at Jaccard
/// 0.5 meet in some band with probability 0.87, at 0.7 with 0.9996.
const BANDS: usize = 32;
const ROWS: usize = PERMUTATIONS / BANDS;
/// Words per shingle.
const SHINGLE: usize = 3;

/// Why a text is a duplicate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Duplicate {
    /// The same text.
    Exact,
    /// Similar above the threshold.
    Near,
}

fn fold(text: &str) -> Vec<String> {
    text.split_whitespace().map(str::to_lowercase).collect()
}

/// splitmix64 (Steele, Lea & Flood 2014): a fast, well-mixed 64-bit hash step.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// FNV-1a of a shingle.
fn fnv(words: &[String]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for w in words {
        for b in w.bytes().chain([0u8]) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x100_0000_01b3);
        }
    }
    h
}

/// The MinHash signature of a text.
pub fn signature(text: &str) -> Vec<u64> {
    let words = fold(text);
    let shingles: HashSet<u64> = if words.len() < SHINGLE {
        HashSet::from([fnv(&words)])
    } else {
        words.windows(SHINGLE).map(fnv).collect()
    };
    (0..PERMUTATIONS as u64)
        .map(|i| {
            let salt = mix(i + 1);
            shingles
                .iter()
                .map(|s| mix(s ^ salt))
                .min()
                .unwrap_or(u64::MAX)
        })
        .collect()
}

/// The fraction of equal positions: an estimate of the Jaccard similarity of the shingle sets.
pub fn similarity(a: &[u64], b: &[u64]) -> f64 {
    let equal = a.iter().zip(b).filter(|(x, y)| x == y).count();
    equal as f64 / a.len().max(1) as f64
}

/// The texts accepted so far.
#[derive(Debug, Default)]
pub struct Index {
    exact: bool,
    near_threshold: Option<f64>,
    hashes: HashSet<[u8; 32]>,
    signatures: Vec<Vec<u64>>,
    bands: HashMap<(usize, u64), Vec<usize>>,
}

impl Index {
    /// An empty index with the spec's settings.
    pub fn new(exact: bool, near_threshold: Option<f64>) -> Self {
        Self {
            exact,
            near_threshold,
            ..Default::default()
        }
    }

    fn exact_hash(text: &str) -> [u8; 32] {
        Sha256::digest(fold(text).join(" ").as_bytes()).into()
    }

    fn band_keys(signature: &[u64]) -> impl Iterator<Item = (usize, u64)> + '_ {
        signature
            .chunks(ROWS)
            .enumerate()
            .map(|(band, rows)| (band, rows.iter().fold(band as u64, |h, r| mix(h ^ r))))
    }

    /// Whether `text` duplicates an accepted text.
    pub fn check(&self, text: &str) -> Option<Duplicate> {
        if self.exact && self.hashes.contains(&Self::exact_hash(text)) {
            return Some(Duplicate::Exact);
        }
        let threshold = self.near_threshold?;
        let sig = signature(text);
        let mut seen = HashSet::new();
        for key in Self::band_keys(&sig) {
            for &other in self.bands.get(&key).into_iter().flatten() {
                if seen.insert(other) && similarity(&sig, &self.signatures[other]) >= threshold {
                    return Some(Duplicate::Near);
                }
            }
        }
        None
    }

    /// Records an accepted text.
    pub fn insert(&mut self, text: &str) {
        self.hashes.insert(Self::exact_hash(text));
        if self.near_threshold.is_some() {
            let sig = signature(text);
            let id = self.signatures.len();
            for key in Self::band_keys(&sig) {
                self.bands.entry(key).or_default().push(id);
            }
            self.signatures.push(sig);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "The train leaves the station at nine and arrives in the city at noon with four hundred passengers on board today";

    #[test]
    fn exact_duplicates_ignore_case_and_spacing() {
        let mut index = Index::new(true, None);
        index.insert(A);
        assert_eq!(
            index.check(&A.to_uppercase().replace(' ', "  ")),
            Some(Duplicate::Exact)
        );
        assert_eq!(index.check("something else"), None);
    }

    #[test]
    fn near_duplicates_are_caught_and_different_texts_are_not() {
        let mut index = Index::new(true, Some(0.6));
        index.insert(A);
        let edited = A.replace("today", "this morning");
        assert_eq!(index.check(&edited), Some(Duplicate::Near));
        let other = "A recipe for bread needs flour water salt and yeast, kneaded for ten minutes and left to rise overnight";
        assert_eq!(index.check(other), None);
        assert!(similarity(&signature(A), &signature(other)) < 0.1);
        assert!(similarity(&signature(A), &signature(&edited)) > 0.7);
    }

    #[test]
    fn exact_off_still_catches_near() {
        let mut index = Index::new(false, Some(0.9));
        index.insert(A);
        assert_eq!(index.check(A), Some(Duplicate::Near));
        let index = Index::new(false, None);
        assert_eq!(index.check(A), None);
    }
}
