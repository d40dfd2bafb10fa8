//! An organisation's ownership graph and the effective share held from restricted regions.
//!
//! Effective ownership multiplies shares along each chain and sums across paths, so an entity
//! holding 60% of a holding that holds 90% of the organisation counts for 54%. An owner located
//! in a restricted region counts with its whole stake; its own owners are not walked further.
//! The graph arrives as a tree of named owners; a name that reappears among its own ancestors is a
//! cycle and is refused when the tree is built, as are out-of-range shares and over-deep trees.
//! Names are compared as a registry would ([`same_owner`]: trimmed, case-folded, inner spacing
//! collapsed), so `B`, `b` and `B ` are one owner.

use crate::region::RegionCode;

/// How deep an ownership chain may go (the organisation's direct owners are depth 1).
pub const MAX_OWNERSHIP_DEPTH: usize = 16;
/// How many owners one graph may name in all.
pub const MAX_OWNERS: usize = 1024;
/// Shares of one entity's owners may add up to 100% plus this rounding slack.
const SHARE_SUM_SLACK: f64 = 0.01;

/// One owner of an entity, with its own owners.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Owner {
    pub name: String,
    pub region: Option<RegionCode>,
    /// 0 to 100.
    pub share_percent: f64,
    pub owners: Vec<Owner>,
}

/// A checked organisation: shares in range, no cycles, bounded depth and size.
/// Deserialised only from the audit log, which holds organisations that were checked on the way in.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Organization {
    headquarters: Option<RegionCode>,
    owners: Vec<Owner>,
}

/// Why an ownership graph was refused; `field` is the path of the offending field below the
/// organisation, e.g. `owners[0].owners[1].share_percent`.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct OwnershipError {
    pub field: String,
    pub problem: String,
}

/// The part of an organisation held, through any chain, by owners in restricted regions.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RestrictedOwnership {
    pub percent: f64,
    /// Names (or regions, for unnamed owners) of the restricted owners that contribute.
    pub owners: Vec<String>,
}

impl Organization {
    pub fn new(
        headquarters: Option<RegionCode>,
        owners: Vec<Owner>,
    ) -> Result<Self, OwnershipError> {
        check_level(&owners, &mut Vec::new(), &mut Vec::new(), &mut 0)?;
        Ok(Self {
            headquarters,
            owners,
        })
    }

    pub fn headquarters(&self) -> Option<RegionCode> {
        self.headquarters
    }

    pub fn owners(&self) -> &[Owner] {
        &self.owners
    }

    /// Effective share held by owners for which `is_restricted` holds.
    pub fn restricted_share(
        &self,
        is_restricted: &dyn Fn(RegionCode) -> bool,
    ) -> RestrictedOwnership {
        let mut found = RestrictedOwnership::default();
        let fraction = walk(&self.owners, is_restricted, &mut found.owners);
        found.percent = (fraction * 100.0).clamp(0.0, 100.0);
        found
    }
}

/// Fraction (0..=1) of an entity held from restricted regions through `owners`.
fn walk(
    owners: &[Owner],
    is_restricted: &dyn Fn(RegionCode) -> bool,
    names: &mut Vec<String>,
) -> f64 {
    owners
        .iter()
        .map(|owner| {
            let stake = owner.share_percent / 100.0;
            if owner.region.is_some_and(is_restricted) {
                let label = match (owner.name.is_empty(), owner.region) {
                    (false, _) => owner.name.clone(),
                    (true, Some(region)) => format!("unnamed owner in {region}"),
                    (true, None) => "unnamed owner".to_owned(),
                };
                if !names.iter().any(|known| same_owner(known, &label)) {
                    names.push(label);
                }
                stake
            } else {
                stake * walk(&owner.owners, is_restricted, names)
            }
        })
        .sum()
}

/// `percent` for people, against `threshold`: two decimals, or as many more as it takes for the
/// text to stand where the value stands (above, at or below the threshold). 50.001 against 50
/// prints `50.001`, never `50.00`, which would read as the threshold itself.
pub fn share_text(percent: f64, threshold: f64) -> String {
    let side = percent.partial_cmp(&threshold);
    for decimals in 2..=17 {
        let text = format!("{percent:.decimals$}");
        if text
            .parse::<f64>()
            .ok()
            .and_then(|shown| shown.partial_cmp(&threshold))
            == side
        {
            return text;
        }
    }
    percent.to_string()
}

/// Whether two owner names name the same owner: compared trimmed, case-folded (upper- then
/// lower-cased, so `ß` and `SS` meet) and with each run of inner whitespace as one space.
pub fn same_owner(a: &str, b: &str) -> bool {
    name_key(a).eq(name_key(b))
}

/// The characters [`same_owner`] compares, without allocating.
fn name_key(name: &str) -> impl Iterator<Item = char> + '_ {
    let mut words = name.split_whitespace().peekable();
    std::iter::from_fn(move || {
        let word = words.next()?;
        let space = words.peek().is_some().then_some(' ');
        Some(word.chars().chain(space))
    })
    .flatten()
    .flat_map(char::to_uppercase)
    .flat_map(char::to_lowercase)
}

/// The field path of `leaf` below the owners at `path` (indices from the organisation down):
/// `owner_field(&[0, 1], "name")` is `owners[0].owners[1].name`; `owner_field(&[0], "owners")`
/// is `owners[0].owners`. Built only when there is an error to report.
pub fn owner_field(path: &[usize], leaf: &str) -> String {
    let mut field = String::new();
    for index in path {
        field.push_str(&format!("owners[{index}]."));
    }
    field.push_str(leaf);
    field
}

fn check_level<'a>(
    owners: &'a [Owner],
    path: &mut Vec<usize>,
    ancestors: &mut Vec<&'a str>,
    count: &mut usize,
) -> Result<(), OwnershipError> {
    if owners.is_empty() {
        return Ok(());
    }
    let error = |field: String, problem: String| Err(OwnershipError { field, problem });
    if path.len() >= MAX_OWNERSHIP_DEPTH {
        return error(
            owner_field(path, "owners"),
            format!("ownership chain deeper than {MAX_OWNERSHIP_DEPTH} levels"),
        );
    }
    *count += owners.len();
    if *count > MAX_OWNERS {
        return error(
            owner_field(path, "owners"),
            format!("more than {MAX_OWNERS} owners in one graph"),
        );
    }
    let mut sum = 0.0;
    for (i, owner) in owners.iter().enumerate() {
        path.push(i);
        let share = owner.share_percent;
        if !share.is_finite() || !(0.0..=100.0).contains(&share) {
            return error(
                owner_field(path, "share_percent"),
                format!("{share} is not between 0 and 100"),
            );
        }
        sum += share;
        let named = !owner.name.is_empty();
        if named && ancestors.iter().any(|a| same_owner(a, &owner.name)) {
            return error(
                owner_field(path, "name"),
                format!(
                    "ownership cycle: {:?} owns itself through a chain",
                    owner.name
                ),
            );
        }
        if named {
            ancestors.push(&owner.name);
        }
        check_level(&owner.owners, path, ancestors, count)?;
        if named {
            ancestors.pop();
        }
        path.pop();
    }
    if sum > 100.0 + SHARE_SUM_SLACK {
        return error(
            owner_field(path, "owners"),
            format!("shares add up to {sum}%, more than 100%"),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn owner(name: &str, region: &str, share: f64, owners: Vec<Owner>) -> Owner {
        let region = (!region.is_empty()).then(|| RegionCode::parse(region).unwrap());
        Owner {
            name: name.into(),
            region,
            share_percent: share,
            owners,
        }
    }

    fn is_ir(region: RegionCode) -> bool {
        region.country().as_str() == "IR"
    }

    #[test]
    fn multiplies_along_chains_and_sums_across_paths() {
        // 60% of a holding that owns 90% -> 54%; plus a direct 10% -> 64%.
        let org = Organization::new(
            None,
            vec![
                owner(
                    "Holding",
                    "AE",
                    90.0,
                    vec![owner("Parent", "IR", 60.0, vec![])],
                ),
                owner("Direct", "IR", 10.0, vec![]),
            ],
        )
        .unwrap();
        let share = org.restricted_share(&is_ir);
        assert!((share.percent - 64.0).abs() < 1e-9, "{share:?}");
        assert_eq!(share.owners, vec!["Parent".to_owned(), "Direct".to_owned()]);
    }

    #[test]
    fn restricted_owner_counts_whole_stake_without_walking_further() {
        let org = Organization::new(
            None,
            vec![owner(
                "P",
                "IR",
                40.0,
                vec![owner("Q", "IR", 100.0, vec![])],
            )],
        )
        .unwrap();
        assert!((org.restricted_share(&is_ir).percent - 40.0).abs() < 1e-9);
    }

    #[test]
    fn a_share_never_prints_across_or_onto_the_threshold() {
        assert_eq!(share_text(64.0, 50.0), "64.00");
        assert_eq!(share_text(54.00000000000001, 50.0), "54.00");
        assert_eq!(share_text(50.001, 50.0), "50.001");
        assert_eq!(share_text(50.0000001, 50.0), "50.0000001");
        assert_eq!(share_text(50.0, 50.0), "50.00");
        assert_eq!(share_text(49.999, 50.0), "49.999");
        assert_eq!(share_text(33.3334, 33.333), "33.3334");
        let next = f64::from_bits(50.0f64.to_bits() + 1);
        assert!(share_text(next, 50.0).parse::<f64>().unwrap() > 50.0);
    }

    #[test]
    fn names_compare_trimmed_case_folded_and_with_spacing_collapsed() {
        assert!(same_owner("B", "b"));
        assert!(same_owner("B", " B "));
        assert!(same_owner("Bolt  Holding\tLtd", "bolt holding ltd"));
        assert!(same_owner("Straße AG", "STRASSE AG"));
        assert!(!same_owner("B", "BB"));
        assert!(!same_owner("Bolt Holding", "BoltHolding"));
        for again in ["b", "B ", " b", "\tB"] {
            let cycle = vec![owner(
                "A",
                "AE",
                50.0,
                vec![owner(
                    "B",
                    "AE",
                    50.0,
                    vec![owner(again, "AE", 50.0, vec![])],
                )],
            )];
            let err = Organization::new(None, cycle).unwrap_err();
            assert_eq!(err.field, "owners[0].owners[0].owners[0].name", "{again:?}");
        }
        // The owners named in a finding are one per owner, however each path spells it.
        let org = Organization::new(
            None,
            vec![
                owner("H1", "AE", 50.0, vec![owner("Parent", "IR", 50.0, vec![])]),
                owner("H2", "AE", 50.0, vec![owner(" parent", "IR", 50.0, vec![])]),
            ],
        )
        .unwrap();
        assert_eq!(
            org.restricted_share(&is_ir).owners,
            vec!["Parent".to_owned()]
        );
    }

    #[test]
    fn refuses_cycles_bad_shares_and_deep_graphs() {
        let cycle = vec![owner(
            "A",
            "AE",
            50.0,
            vec![owner("B", "AE", 50.0, vec![owner("A", "IR", 50.0, vec![])])],
        )];
        let err = Organization::new(None, cycle).unwrap_err();
        assert_eq!(err.field, "owners[0].owners[0].owners[0].name");

        let negative = Organization::new(None, vec![owner("A", "", -1.0, vec![])]).unwrap_err();
        assert_eq!(negative.field, "owners[0].share_percent");
        let over = Organization::new(None, vec![owner("A", "", 100.5, vec![])]).unwrap_err();
        assert_eq!(over.field, "owners[0].share_percent");
        let nan = Organization::new(None, vec![owner("A", "", f64::NAN, vec![])]).unwrap_err();
        assert_eq!(nan.field, "owners[0].share_percent");
        let sum = Organization::new(
            None,
            vec![owner("A", "", 60.0, vec![]), owner("B", "", 60.0, vec![])],
        )
        .unwrap_err();
        assert_eq!(sum.field, "owners");

        let mut deep = owner("leaf", "IR", 100.0, vec![]);
        for i in 0..MAX_OWNERSHIP_DEPTH {
            deep = owner(&format!("o{i}"), "AE", 100.0, vec![deep]);
        }
        let err = Organization::new(None, vec![deep]).unwrap_err();
        assert!(err.problem.contains("deeper"), "{err}");
    }

    fn arb_owner() -> impl Strategy<Value = Owner> {
        let leaf = (0.0..=100.0f64, prop::bool::ANY)
            .prop_map(|(share, ir)| owner("", if ir { "IR" } else { "DE" }, share, vec![]));
        leaf.prop_recursive(4, 32, 3, |inner| {
            (prop::collection::vec(inner, 0..3), prop::bool::ANY).prop_map(|(mut owners, ir)| {
                let n = owners.len().max(1) as f64;
                for o in &mut owners {
                    o.share_percent /= n;
                }
                owner("", if ir { "IR" } else { "DE" }, 100.0 / n.max(1.0), owners)
            })
        })
    }

    proptest! {
        #[test]
        fn restricted_share_stays_within_0_and_100(owners in prop::collection::vec(arb_owner(), 0..3)) {
            let n = owners.len().max(1) as f64;
            let owners: Vec<Owner> = owners.into_iter().map(|mut o| { o.share_percent /= n; o }).collect();
            let org = Organization::new(None, owners).unwrap();
            let share = org.restricted_share(&is_ir).percent;
            prop_assert!((0.0..=100.0).contains(&share));
        }

        /// Restricting more regions never lowers the restricted share, and restricting every
        /// region gives exactly the share held by the direct owners.
        #[test]
        fn restricting_more_never_lowers_the_share(owners in prop::collection::vec(arb_owner(), 0..3)) {
            let n = owners.len().max(1) as f64;
            let owners: Vec<Owner> = owners.into_iter().map(|mut o| { o.share_percent /= n; o }).collect();
            let direct: f64 = owners.iter().map(|o| o.share_percent).sum();
            let org = Organization::new(None, owners).unwrap();
            let ir = org.restricted_share(&is_ir).percent;
            let ir_or_de = org.restricted_share(&|r: RegionCode| matches!(r.country().as_str(), "IR" | "DE")).percent;
            let nothing = org.restricted_share(&|_| false).percent;
            prop_assert!(ir_or_de + 1e-9 >= ir, "{ir_or_de} < {ir}");
            prop_assert_eq!(nothing, 0.0);
            prop_assert!((ir_or_de - direct.min(100.0)).abs() < 1e-6, "{ir_or_de} vs {direct}");
        }
    }
}
