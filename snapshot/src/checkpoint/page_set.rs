//! A set of guest pages: one bit per page, in the word layout KVM's dirty log and
//! vm-memory's bitmap share (bit `i % 64` of word `i / 64`).

use serde::{Deserialize, Serialize};

/// Most pages a stored set may range over (1 TiB of 4 KiB pages).
pub const MAX_PAGES: u64 = 1 << 28;

/// A set of page numbers in `0..len`.
///
/// ```
/// use snapshot::checkpoint::PageSet;
/// let mut pages = PageSet::new(200);
/// pages.insert(3);
/// pages.insert(4);
/// pages.insert(130);
/// assert_eq!(pages.runs().collect::<Vec<_>>(), vec![(3, 2), (130, 1)]);
/// assert_eq!(pages.count(), 3);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "PageRuns", try_from = "PageRuns")]
pub struct PageSet {
    len: u64,
    words: Vec<u64>,
}

/// How a [`PageSet`] is stored: runs of consecutive pages.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct PageRuns {
    pages: u64,
    runs: Vec<(u64, u64)>,
}

impl From<PageSet> for PageRuns {
    fn from(set: PageSet) -> Self {
        PageRuns {
            pages: set.len,
            runs: set.runs().collect(),
        }
    }
}

impl TryFrom<PageRuns> for PageSet {
    type Error = String;

    fn try_from(runs: PageRuns) -> Result<Self, String> {
        // 2^28 pages is 1 TiB of guest memory, a 32 MiB bitmap: a hostile file cannot make
        // the reader allocate more.
        if runs.pages > MAX_PAGES {
            return Err(format!("page list of {} pages", runs.pages));
        }
        let mut set = PageSet::new(runs.pages);
        for (first, count) in runs.runs {
            let end = first
                .checked_add(count)
                .filter(|&end| end <= runs.pages)
                .ok_or_else(|| format!("page run {first}+{count} outside {} pages", runs.pages))?;
            set.insert_range(first, end - first);
        }
        Ok(set)
    }
}

impl PageSet {
    /// An empty set over `len` pages.
    pub fn new(len: u64) -> Self {
        PageSet {
            len,
            words: vec![0; len.div_ceil(64) as usize],
        }
    }

    /// A set over `len` pages holding them all.
    pub fn full(len: u64) -> Self {
        let mut set = PageSet::new(len);
        set.insert_range(0, len);
        set
    }

    /// A set over `len` pages from bitmap words (extra bits past `len` are dropped).
    pub fn from_words(len: u64, mut words: Vec<u64>) -> Self {
        words.resize(len.div_ceil(64) as usize, 0);
        let mut set = PageSet { len, words };
        set.clear_tail();
        set
    }

    fn clear_tail(&mut self) {
        if self.len % 64 != 0 {
            if let Some(last) = self.words.last_mut() {
                *last &= (1u64 << (self.len % 64)) - 1;
            }
        }
    }

    /// Number of pages the set ranges over.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the set ranges over no pages at all.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bitmap words.
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// Adds page `page` (ignored past the end).
    pub fn insert(&mut self, page: u64) {
        if page < self.len {
            self.words[(page / 64) as usize] |= 1 << (page % 64);
        }
    }

    /// Adds pages `first..first + count` (clipped to the end).
    pub fn insert_range(&mut self, first: u64, count: u64) {
        let end = first.saturating_add(count).min(self.len);
        let mut page = first;
        while page < end {
            if page % 64 == 0 && end - page >= 64 {
                self.words[(page / 64) as usize] = u64::MAX;
                page += 64;
            } else {
                self.insert(page);
                page += 1;
            }
        }
    }

    /// Whether page `page` is in the set.
    pub fn contains(&self, page: u64) -> bool {
        page < self.len && self.words[(page / 64) as usize] & (1 << (page % 64)) != 0
    }

    /// Adds every page of `other` (same length) or of the bitmap words `words` at page
    /// `offset` (for one memory region's dirty log).
    pub fn union_words_at(&mut self, offset: u64, words: &[u64]) {
        if offset % 64 == 0 {
            let start = (offset / 64) as usize;
            for (i, word) in words.iter().enumerate() {
                if let Some(target) = self.words.get_mut(start + i) {
                    *target |= word;
                }
            }
            self.clear_tail();
        } else {
            for (i, &word) in words.iter().enumerate() {
                let mut bits = word;
                while bits != 0 {
                    let bit = u64::from(bits.trailing_zeros());
                    self.insert(offset + i as u64 * 64 + bit);
                    bits &= bits - 1;
                }
            }
        }
    }

    /// Adds every page of `other`.
    pub fn union(&mut self, other: &PageSet) {
        self.union_words_at(0, &other.words);
    }

    /// Number of pages in the set.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Runs of consecutive pages: (first page, count), ascending.
    pub fn runs(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        let mut page = 0u64;
        std::iter::from_fn(move || {
            // Skip clear pages, a whole word at a time where possible.
            while page < self.len {
                let word = self.words[(page / 64) as usize] >> (page % 64);
                if word == 0 {
                    page = (page / 64 + 1) * 64;
                    continue;
                }
                page += u64::from(word.trailing_zeros());
                break;
            }
            if page >= self.len {
                return None;
            }
            let first = page;
            while page < self.len {
                let index = (page / 64) as usize;
                let clear = (!self.words[index]) >> (page % 64);
                if clear == 0 {
                    page = (index as u64 + 1) * 64;
                } else {
                    page += u64::from(clear.trailing_zeros());
                    break;
                }
            }
            let end = page.min(self.len);
            page = end;
            Some((first, end - first))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn runs_round_trip(len in 1u64..700, pages in proptest::collection::vec(0u64..700, 0..200)) {
            let mut set = PageSet::new(len);
            for &p in &pages {
                set.insert(p);
            }
            let mut rebuilt = PageSet::new(len);
            for (first, count) in set.runs() {
                prop_assert!(count > 0);
                for p in first..first + count {
                    prop_assert!(set.contains(p));
                }
                rebuilt.insert_range(first, count);
            }
            prop_assert_eq!(&rebuilt, &set);
            let expected = pages.iter().filter(|&&p| p < len).collect::<std::collections::BTreeSet<_>>().len() as u64;
            prop_assert_eq!(set.count(), expected);
            let json = serde_json::to_string(&set).unwrap();
            let back: PageSet = serde_json::from_str(&json).unwrap();
            prop_assert_eq!(back, set);
        }
    }

    #[test]
    fn refuses_huge_sets() {
        let err =
            serde_json::from_str::<PageSet>(r#"{"pages":1099511627776,"runs":[]}"#).unwrap_err();
        assert!(err.to_string().contains("page list of"), "{err}");
    }

    #[test]
    fn refuses_runs_outside_the_set() {
        let err = serde_json::from_str::<PageSet>(r#"{"pages":10,"runs":[[8,5]]}"#).unwrap_err();
        assert!(err.to_string().contains("outside 10 pages"), "{err}");
    }

    #[test]
    fn unions_region_words_at_an_offset() {
        let mut set = PageSet::new(256);
        set.union_words_at(64, &[0b101]);
        set.union_words_at(3, &[0b1]);
        assert!(set.contains(64) && set.contains(66) && set.contains(3));
        assert_eq!(set.count(), 3);
    }
}
