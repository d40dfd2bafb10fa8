//! Client hint parsing: the regions an Accept-Language header names.
//!
//! Only region subtags count ("fa-IR" names IR; "fa" names no region): a language alone says
//! little about where someone is.

use crate::region::CountryCode;

/// Longest Accept-Language header read; the rest is ignored.
const MAX_HEADER: usize = 1024;
/// Most language ranges read from one header.
const MAX_RANGES: usize = 16;

/// Distinct regions named by the header's language ranges, in header order.
pub fn accept_language_regions(header: &str) -> Vec<CountryCode> {
    let mut end = header.len().min(MAX_HEADER);
    while !header.is_char_boundary(end) {
        end -= 1;
    }
    let mut regions = Vec::new();
    for range in header[..end].split(',').take(MAX_RANGES) {
        let tag = range.split(';').next().unwrap_or("").trim();
        // language[-script][-region][-...]: the region is the first 2-letter subtag after the first.
        let region = tag
            .split(['-', '_'])
            .skip(1)
            .find(|sub| sub.len() == 2 && sub.bytes().all(|b| b.is_ascii_alphabetic()));
        if let Some(code) = region.and_then(|r| CountryCode::parse(r).ok())
            && !regions.contains(&code)
        {
            regions.push(code);
        }
    }
    regions
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn codes(header: &str) -> Vec<String> {
        accept_language_regions(header)
            .iter()
            .map(|c| c.to_string())
            .collect()
    }

    #[test]
    fn reads_region_subtags() {
        assert_eq!(codes("fa-IR,fa;q=0.9,en-US;q=0.8,en;q=0.7"), ["IR", "US"]);
        assert_eq!(codes("zh-Hant-HK"), ["HK"]);
        assert_eq!(codes("en_gb"), ["GB"]);
        assert!(codes("fa, ru").is_empty());
        assert!(codes("*").is_empty());
        assert!(
            codes("en-QQ").is_empty(),
            "unassigned codes are not regions"
        );
    }

    proptest! {
        #[test]
        fn never_panics_and_bounded(header in "\\PC{0,2000}") {
            prop_assert!(accept_language_regions(&header).len() <= MAX_RANGES);
        }
    }
}
