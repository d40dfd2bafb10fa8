//! Region codes: ISO 3166-1 alpha-2 countries and ISO 3166-2 subdivisions.
//!
//! Parsed once at the edge (caller input, policy file, database records) so the core only ever
//! sees checked, `Copy` values. Caller input is checked against the ISO 3166-1 list and the
//! ISO 3166-2 table (`subdivisions.rs`); database records are trusted to be well-formed codes but
//! may use codes outside them.

use std::fmt;

mod subdivisions;

/// Officially assigned ISO 3166-1 alpha-2 codes, plus `XK` (Kosovo), which MaxMind and most
/// registries use although it is user-assigned.
const ISO_3166_1: &str = "AD AE AF AG AI AL AM AO AQ AR AS AT AU AW AX AZ \
BA BB BD BE BF BG BH BI BJ BL BM BN BO BQ BR BS BT BV BW BY BZ \
CA CC CD CF CG CH CI CK CL CM CN CO CR CU CV CW CX CY CZ DE DJ DK DM DO DZ \
EC EE EG EH ER ES ET FI FJ FK FM FO FR \
GA GB GD GE GF GG GH GI GL GM GN GP GQ GR GS GT GU GW GY HK HM HN HR HT HU \
ID IE IL IM IN IO IQ IR IS IT JE JM JO JP KE KG KH KI KM KN KP KR KW KY KZ \
LA LB LC LI LK LR LS LT LU LV LY \
MA MC MD ME MF MG MH MK ML MM MN MO MP MQ MR MS MT MU MV MW MX MY MZ \
NA NC NE NF NG NI NL NO NP NR NU NZ OM PA PE PF PG PH PK PL PM PN PR PS PT PW PY QA \
RE RO RS RU RW SA SB SC SD SE SG SH SI SJ SK SL SM SN SO SR SS ST SV SX SY SZ \
TC TD TF TG TH TJ TK TL TM TN TO TR TT TV TW TZ UA UG UM US UY UZ \
VA VC VE VG VI VN VU WF WS XK YE YT ZA ZM ZW";

/// The assigned codes as a table: bit `b` of row `a` is set when the code with first letter
/// `A + a` and second letter `A + b` is in [`ISO_3166_1`]. Built at compile time, so checking a
/// caller's code is one load, not a scan of the list.
const ASSIGNED: [u32; 26] = {
    let list = ISO_3166_1.as_bytes();
    let mut table = [0u32; 26];
    let mut i = 0;
    while i + 1 < list.len() {
        table[(list[i] - b'A') as usize] |= 1 << (list[i + 1] - b'A');
        i += 3;
    }
    table
};

/// Why a string is not a region code. Each holds an [`excerpt`](crate::excerpt) of the text,
/// never the whole of it: the text is caller input, and the error goes back to the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegionCodeError {
    #[error("{0:?} is not an ISO 3166-1 alpha-2 country code (two upper-case letters)")]
    Malformed(String),
    #[error("{0:?} is not an assigned ISO 3166-1 alpha-2 country code")]
    Unassigned(String),
    #[error("{0:?} is not an ISO 3166-2 subdivision code (CC-XXX, 1 to 3 letters or digits)")]
    MalformedSubdivision(String),
    #[error("{0:?} is not an assigned ISO 3166-2 subdivision code")]
    UnassignedSubdivision(String),
}

fn shown(text: &str) -> String {
    crate::excerpt(text).to_owned()
}

/// An ISO 3166-1 alpha-2 country code, upper case.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CountryCode([u8; 2]);

impl CountryCode {
    /// Parses caller or policy input: two ASCII letters (case-insensitive), assigned in ISO 3166-1.
    pub fn parse(s: &str) -> Result<Self, RegionCodeError> {
        let code = Self::from_record(s).ok_or_else(|| RegionCodeError::Malformed(shown(s)))?;
        let [a, b] = code.0;
        if ASSIGNED[usize::from(a - b'A')] & (1 << (b - b'A')) != 0 {
            Ok(code)
        } else {
            Err(RegionCodeError::Unassigned(shown(s)))
        }
    }

    /// Reads a code from a database record: any two ASCII letters (databases use a few codes
    /// outside ISO 3166-1, such as `EU`), or `None`.
    pub fn from_record(s: &str) -> Option<Self> {
        match s.as_bytes() {
            [a, b] if a.is_ascii_alphabetic() && b.is_ascii_alphabetic() => {
                Some(Self([a.to_ascii_uppercase(), b.to_ascii_uppercase()]))
            }
            _ => None,
        }
    }

    pub fn as_str(&self) -> &str {
        // Both bytes are ASCII letters by construction.
        std::str::from_utf8(&self.0).unwrap_or("??")
    }

    /// A dense index 0..676, for table lookups.
    pub fn index(&self) -> usize {
        usize::from(self.0[0] - b'A') * 26 + usize::from(self.0[1] - b'A')
    }
}

impl fmt::Display for CountryCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for CountryCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CountryCode({})", self.as_str())
    }
}

/// A country or one of its ISO 3166-2 subdivisions ("UA", "UA-43").
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RegionCode {
    country: CountryCode,
    /// Subdivision part, upper case, zero-padded; `len == 0` means the whole country.
    sub: [u8; 3],
    len: u8,
}

impl RegionCode {
    /// The assigned ISO 3166-2 subdivision codes (`CC-XXX`), sorted.
    pub fn assigned_subdivisions() -> &'static [&'static str] {
        subdivisions::all()
    }

    pub fn country_only(country: CountryCode) -> Self {
        Self {
            country,
            sub: [0; 3],
            len: 0,
        }
    }

    /// Joins a country and a database subdivision code ("UA" + "43" = "UA-43").
    pub fn subdivision(country: CountryCode, code: &str) -> Option<Self> {
        let bytes = code.as_bytes();
        if bytes.is_empty() || bytes.len() > 3 || !bytes.iter().all(u8::is_ascii_alphanumeric) {
            return None;
        }
        let mut sub = [0; 3];
        for (slot, b) in sub.iter_mut().zip(bytes) {
            *slot = b.to_ascii_uppercase();
        }
        Some(Self {
            country,
            sub,
            len: bytes.len() as u8,
        })
    }

    /// Parses "CC" or "CC-XXX" from caller or policy input (case-insensitive); the country must
    /// be assigned in ISO 3166-1 and the subdivision in ISO 3166-2.
    pub fn parse(s: &str) -> Result<Self, RegionCodeError> {
        match s.split_once('-') {
            None => CountryCode::parse(s).map(Self::country_only),
            Some((country, sub)) => {
                let country = CountryCode::parse(country)?;
                let region = Self::subdivision(country, sub)
                    .ok_or_else(|| RegionCodeError::MalformedSubdivision(shown(s)))?;
                let mut code = [0u8; 6];
                code[..2].copy_from_slice(&country.0);
                code[2] = b'-';
                let len = 3 + usize::from(region.len);
                code[3..len].copy_from_slice(&region.sub[..usize::from(region.len)]);
                if subdivisions::is_assigned(&code[..len]) {
                    Ok(region)
                } else {
                    Err(RegionCodeError::UnassignedSubdivision(shown(s)))
                }
            }
        }
    }

    pub fn country(&self) -> CountryCode {
        self.country
    }

    pub fn is_subdivision(&self) -> bool {
        self.len > 0
    }
}

impl fmt::Display for RegionCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.country.as_str())?;
        if self.len > 0 {
            let sub = std::str::from_utf8(&self.sub[..usize::from(self.len)]).unwrap_or("?");
            write!(f, "-{sub}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for RegionCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RegionCode({self})")
    }
}

/// Region codes are stored (audit log) as their text, "UA-43".
impl serde::Serialize for CountryCode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> serde::Deserialize<'de> for CountryCode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Self::from_record(&text)
            .ok_or_else(|| serde::de::Error::custom(format!("{text:?} is not a country code")))
    }
}

impl serde::Serialize for RegionCode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for RegionCode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        let bad = || serde::de::Error::custom(format!("{text:?} is not a region code"));
        match text.split_once('-') {
            None => CountryCode::from_record(&text)
                .map(Self::country_only)
                .ok_or_else(bad),
            Some((c, sub)) => CountryCode::from_record(c)
                .and_then(|c| Self::subdivision(c, sub))
                .ok_or_else(bad),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn list_has_every_assigned_code_once() {
        let codes: Vec<&str> = ISO_3166_1.split(' ').collect();
        assert_eq!(codes.len(), 250, "249 assigned codes plus XK");
        let unique: std::collections::BTreeSet<_> = codes.iter().collect();
        assert_eq!(unique.len(), codes.len());
    }

    #[test]
    fn the_table_holds_exactly_the_list() {
        for a in b'A'..=b'Z' {
            for b in b'A'..=b'Z' {
                let code = [a, b];
                let text = std::str::from_utf8(&code).unwrap();
                let listed = ISO_3166_1.split(' ').any(|c| c == text);
                assert_eq!(CountryCode::parse(text).is_ok(), listed, "{text}");
            }
        }
    }

    #[test]
    fn parses_countries_case_insensitively() {
        assert_eq!(CountryCode::parse("ir").unwrap().as_str(), "IR");
        assert!(matches!(
            CountryCode::parse("QQ"),
            Err(RegionCodeError::Unassigned(_))
        ));
        assert!(matches!(
            CountryCode::parse("USA"),
            Err(RegionCodeError::Malformed(_))
        ));
        assert!(matches!(
            CountryCode::parse(""),
            Err(RegionCodeError::Malformed(_))
        ));
    }

    #[test]
    fn parses_subdivisions() {
        let crimea = RegionCode::parse("UA-43").unwrap();
        assert_eq!(crimea.to_string(), "UA-43");
        assert!(crimea.is_subdivision());
        assert_eq!(crimea.country().as_str(), "UA");
        assert_eq!(RegionCode::parse("gb-eng").unwrap().to_string(), "GB-ENG");
        assert!(RegionCode::parse("UA-").is_err());
        assert!(RegionCode::parse("UA-ABCD").is_err());
        assert!(RegionCode::parse("XX-1").is_err());
        assert_eq!(RegionCode::parse("se-e").unwrap().to_string(), "SE-E");
        assert_eq!(RegionCode::parse("fr-2a").unwrap().to_string(), "FR-2A");
    }

    #[test]
    fn refuses_unassigned_subdivisions_of_assigned_countries() {
        for code in ["UA-99", "UA-44", "GB-ZZZ", "US-XX", "DE-1"] {
            assert!(
                matches!(
                    RegionCode::parse(code),
                    Err(RegionCodeError::UnassignedSubdivision(_))
                ),
                "{code}"
            );
        }
        let error = RegionCode::parse("UA-99").unwrap_err().to_string();
        assert_eq!(
            error,
            "\"UA-99\" is not an assigned ISO 3166-2 subdivision code"
        );
        // A database record is read as it is (databases use codes of their own).
        let ua = CountryCode::parse("UA").unwrap();
        assert!(RegionCode::subdivision(ua, "99").is_some());
    }

    #[test]
    fn errors_quote_an_excerpt_of_the_text() {
        let huge = "A".repeat(200_000);
        for error in [
            CountryCode::parse(&huge).unwrap_err(),
            RegionCode::parse(&huge).unwrap_err(),
            RegionCode::parse(&format!("UA-{huge}")).unwrap_err(),
        ] {
            let text = error.to_string();
            assert!(text.len() < 200, "{} bytes: {}", text.len(), &text[..200]);
            assert!(text.contains("is not an ISO 3166"), "{text}");
        }
    }

    proptest! {
        #[test]
        fn parse_never_panics_and_round_trips(s in "\\PC{0,8}") {
            if let Ok(region) = RegionCode::parse(&s) {
                prop_assert_eq!(RegionCode::parse(&region.to_string()).unwrap(), region);
            }
        }

        #[test]
        fn index_is_dense(a in 0u8..26, b in 0u8..26) {
            let code = CountryCode([b'A' + a, b'A' + b]);
            prop_assert!(code.index() < 676);
        }
    }
}
