//! A compact binary form of one account's [`AccountState`], for remote usage history (Redis
//! keeps one value per account). Times are zig-zag varints relative to the account's oldest
//! event, counts varints, so a one-event account is a few dozen bytes.
//!
//! Decoding trusts nothing: every length is checked against what is left and the state's caps
//! are applied again, so a damaged or foreign value is an error, never a panic or a huge
//! allocation.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::NetworkKey;
use super::account::AccountState;
use super::window::{CountryRuns, Counts, Run, Series};
use crate::region::{CountryCode, RegionCode};

const VERSION: u8 = 1;

/// A stored value that is not an account state this version can read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("usage state: {0}")]
pub struct DecodeError(&'static str);

impl DecodeError {
    pub(crate) const SHORT: DecodeError = DecodeError("truncated");
}

struct Writer {
    out: Vec<u8>,
    base: i64,
}

impl Writer {
    fn varint(&mut self, mut v: u128) {
        while v >= 0x80 {
            self.out.push((v as u8) | 0x80);
            v >>= 7;
        }
        self.out.push(v as u8);
    }

    fn count(&mut self, v: u64) {
        self.varint(u128::from(v));
    }

    fn signed(&mut self, v: i64) {
        self.varint(u128::from(((v << 1) ^ (v >> 63)) as u64));
    }

    fn time(&mut self, t: i64) {
        self.signed(t.wrapping_sub(self.base));
    }

    fn bytes(&mut self, b: &[u8]) {
        self.count(b.len() as u64);
        self.out.extend_from_slice(b);
    }

    fn buckets<'a>(&mut self, buckets: impl ExactSizeIterator<Item = &'a (i64, Counts)>) {
        self.count(buckets.len() as u64);
        for (start, counts) in buckets {
            self.time(*start);
            self.count(counts.requests);
            self.count(counts.tokens);
            self.count(counts.anonymized);
        }
    }

    fn set<K>(&mut self, entries: &[(K, i64)], mut key: impl FnMut(&mut Self, &K)) {
        self.count(entries.len() as u64);
        for (k, t) in entries {
            key(self, k);
            self.time(*t);
        }
    }
}

/// Encodes `state`.
pub(crate) fn encode(state: &AccountState) -> Vec<u8> {
    let mut w = Writer {
        out: Vec::with_capacity(64 + state.heap_bytes() / 4),
        base: state.oldest,
    };
    w.out.push(VERSION);
    w.signed(state.oldest);
    let (fine, coarse, newest) = state.series.parts();
    match newest {
        Some(t) => {
            w.out.push(1);
            w.time(t);
        }
        None => w.out.push(0),
    }
    w.buckets(fine.iter());
    w.buckets(coarse.iter());
    w.set(state.ips.entries(), |w, ip| match ip {
        IpAddr::V4(v4) => {
            w.out.push(4);
            w.out.extend_from_slice(&v4.octets());
        }
        IpAddr::V6(v6) => {
            w.out.push(6);
            w.out.extend_from_slice(&v6.octets());
        }
    });
    w.set(state.networks.entries(), |w, n| {
        let (bits, v6) = n.parts();
        w.out.push(u8::from(v6));
        w.varint(bits);
    });
    w.set(state.countries.entries(), |w, c| {
        w.out.extend_from_slice(c.as_str().as_bytes())
    });
    w.set(state.regions.entries(), |w, r| {
        w.bytes(r.to_string().as_bytes())
    });
    w.set(state.asns.entries(), |w, asn| w.count(u64::from(*asn)));
    w.set(state.api_keys.entries(), |w, key| w.bytes(key.as_bytes()));
    let runs: Vec<&Run<CountryCode>> = state.runs.runs().collect();
    w.count(runs.len() as u64);
    for run in runs {
        w.time(run.start);
        w.time(run.end);
        w.out.extend_from_slice(run.country.as_str().as_bytes());
    }
    w.out
}

struct Reader<'a> {
    input: &'a [u8],
    base: i64,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.input.len() < n {
            return Err(DecodeError("truncated"));
        }
        let (head, rest) = self.input.split_at(n);
        self.input = rest;
        Ok(head)
    }

    fn byte(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn varint(&mut self) -> Result<u128, DecodeError> {
        let mut v: u128 = 0;
        for shift in (0..128).step_by(7) {
            let b = self.byte()?;
            v |= u128::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(DecodeError("varint too long"))
    }

    fn count(&mut self) -> Result<u64, DecodeError> {
        u64::try_from(self.varint()?).map_err(|_| DecodeError("count out of range"))
    }

    /// A length of items that each take at least one byte: no longer than what is left.
    fn len(&mut self) -> Result<usize, DecodeError> {
        let n = self.count()?;
        if n > self.input.len() as u64 {
            return Err(DecodeError("length past the end"));
        }
        Ok(n as usize)
    }

    fn signed(&mut self) -> Result<i64, DecodeError> {
        let z = self.count()?;
        Ok(((z >> 1) as i64) ^ -((z & 1) as i64))
    }

    fn time(&mut self) -> Result<i64, DecodeError> {
        Ok(self.base.wrapping_add(self.signed()?))
    }

    fn str(&mut self) -> Result<&'a str, DecodeError> {
        let n = self.len()?;
        std::str::from_utf8(self.take(n)?).map_err(|_| DecodeError("text is not UTF-8"))
    }

    fn country(&mut self) -> Result<CountryCode, DecodeError> {
        let b = self.take(2)?;
        std::str::from_utf8(b)
            .ok()
            .and_then(CountryCode::from_record)
            .ok_or(DecodeError("bad country code"))
    }

    fn buckets(&mut self) -> Result<Vec<(i64, Counts)>, DecodeError> {
        let n = self.len()?;
        (0..n)
            .map(|_| {
                Ok((
                    self.time()?,
                    Counts {
                        requests: self.count()?,
                        tokens: self.count()?,
                        anonymized: self.count()?,
                    },
                ))
            })
            .collect()
    }

    fn set<K: PartialEq>(
        &mut self,
        into: &mut super::window::Recent<K>,
        mut key: impl FnMut(&mut Self) -> Result<K, DecodeError>,
    ) -> Result<(), DecodeError> {
        let n = self.len()?;
        for _ in 0..n {
            let k = key(self)?;
            let t = self.time()?;
            into.touch(k, t);
        }
        Ok(())
    }
}

/// Decodes a value written by [`encode`].
pub(crate) fn decode(input: &[u8]) -> Result<AccountState, DecodeError> {
    let mut r = Reader { input, base: 0 };
    if r.byte()? != VERSION {
        return Err(DecodeError("unknown version"));
    }
    let oldest = r.signed()?;
    r.base = oldest;
    let mut state = AccountState::new(oldest);
    let newest = match r.byte()? {
        0 => None,
        1 => Some(r.time()?),
        _ => return Err(DecodeError("bad flag")),
    };
    let fine = r.buckets()?;
    let coarse = r.buckets()?;
    state.series = Series::from_parts(fine, coarse, newest);
    r.set(&mut state.ips, |r| match r.byte()? {
        4 => {
            let b: [u8; 4] = r.take(4)?.try_into().expect("4 bytes");
            Ok(IpAddr::V4(Ipv4Addr::from(b)))
        }
        6 => {
            let b: [u8; 16] = r.take(16)?.try_into().expect("16 bytes");
            Ok(IpAddr::V6(Ipv6Addr::from(b)))
        }
        _ => Err(DecodeError("bad address family")),
    })?;
    r.set(&mut state.networks, |r| {
        let v6 = match r.byte()? {
            0 => false,
            1 => true,
            _ => return Err(DecodeError("bad network family")),
        };
        Ok(NetworkKey::from_parts(r.varint()?, v6))
    })?;
    r.set(&mut state.countries, Reader::country)?;
    r.set(&mut state.regions, |r| {
        let text = r.str()?;
        let (country, sub) = text.split_once('-').unwrap_or((text, ""));
        let country = CountryCode::from_record(country).ok_or(DecodeError("bad region"))?;
        if sub.is_empty() {
            Ok(RegionCode::country_only(country))
        } else {
            RegionCode::subdivision(country, sub).ok_or(DecodeError("bad region"))
        }
    })?;
    r.set(&mut state.asns, |r| {
        u32::try_from(r.count()?).map_err(|_| DecodeError("bad ASN"))
    })?;
    r.set(&mut state.api_keys, |r| Ok(r.str()?.into()))?;
    let n = r.len()?;
    let mut runs = Vec::with_capacity(n.min(super::account::MAX_RUNS));
    for _ in 0..n {
        runs.push(Run {
            start: r.time()?,
            end: r.time()?,
            country: r.country()?,
        });
    }
    state.runs = CountryRuns::from_runs(super::account::MAX_RUNS, runs);
    if !r.input.is_empty() {
        return Err(DecodeError("trailing bytes"));
    }
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::usage::{EventLocation, UsageEvent};
    use proptest::prelude::*;

    const NOW: i64 = 1_790_000_000;

    fn state_from(events: &[(u8, i64, u8, bool)]) -> AccountState {
        let mut state = AccountState::new(NOW);
        for &(host, dt, country, anonymized) in events {
            let ip: IpAddr = if host % 3 == 0 {
                format!("2001:db8:{host:x}::1").parse().unwrap()
            } else {
                format!("198.51.{host}.7").parse().unwrap()
            };
            let country = ["DE", "FR", "US", "UA"][usize::from(country % 4)];
            let location = EventLocation {
                country: CountryCode::parse(country).ok(),
                subdivisions: RegionCode::parse("UA-43").ok().into_iter().collect(),
                asn: Some(u32::from(host) * 1000),
                anonymized,
            };
            let event = UsageEvent {
                account_id: "a".into(),
                ip,
                timestamp: NOW + dt,
                api_key_id: Some(format!("key-{}", host % 5).into()),
                requests: u64::from(host) + 1,
                input_tokens: 10,
                output_tokens: 5,
                payment_fingerprint: None,
                device_id: None,
                prompt_fingerprint: None,
                organization_domain: None,
            };
            state.apply(&event, &location);
        }
        state
    }

    fn facts_of(state: &AccountState, now: i64) -> crate::classify::UsageFacts {
        let mut facts = crate::classify::UsageFacts::default();
        state.fill(&mut facts, now);
        facts
    }

    proptest! {
        #[test]
        fn a_decoded_state_answers_as_the_original(
            events in prop::collection::vec((any::<u8>(), -700_000i64..90_000, any::<u8>(), any::<bool>()), 0..80),
            at in -100_000i64..200_000,
        ) {
            let state = state_from(&events);
            let bytes = encode(&state);
            let back = decode(&bytes).unwrap();
            prop_assert_eq!(facts_of(&back, NOW + at), facts_of(&state, NOW + at));
            prop_assert_eq!(encode(&back), bytes, "re-encoding is stable");
        }

        #[test]
        fn any_bytes_decode_or_fail_without_panicking(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode(&bytes);
        }
    }

    #[test]
    fn a_one_event_account_is_small() {
        let bytes = encode(&state_from(&[(7, 0, 0, false)]));
        assert!(bytes.len() < 80, "{} bytes", bytes.len());
    }

    #[test]
    fn damaged_values_are_errors() {
        let bytes = encode(&state_from(&[(7, 0, 0, false), (8, 60, 1, true)]));
        assert!(decode(&bytes[..bytes.len() - 1]).is_err());
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(decode(&longer).unwrap_err(), DecodeError("trailing bytes"));
        let mut other = bytes;
        other[0] = 9;
        assert_eq!(decode(&other).unwrap_err(), DecodeError("unknown version"));
    }
}
