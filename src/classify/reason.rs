//! The reason codes: defined here once, with whether each is a compliance rule or a score.
//!
//! The strings are part of the public API (stable UPPER_SNAKE); the table in docs/policy.md lists them.

use std::fmt;

macro_rules! reason_codes {
    ($($variant:ident = $text:literal, $hard:literal, $doc:literal;)*) => {
        /// Why a decision came out as it did.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum ReasonCode {
            $(#[doc = $doc] $variant,)*
        }

        impl ReasonCode {
            /// Every code, in declaration order.
            pub const ALL: &'static [ReasonCode] = &[$(ReasonCode::$variant,)*];

            pub const fn as_str(self) -> &'static str {
                match self { $(ReasonCode::$variant => $text,)* }
            }

            /// A hard code is a compliance rule: it denies whatever the score.
            pub const fn is_hard(self) -> bool {
                match self { $(ReasonCode::$variant => $hard,)* }
            }

            /// What the code means, for humans (docs/policy.md table, reason messages).
            pub const fn description(self) -> &'static str {
                match self { $(ReasonCode::$variant => $doc,)* }
            }

            /// Whether the policy gives the code a weight (soft codes, except overrides, which
            /// decide the verdict rather than add to the score).
            pub const fn is_weighted(self) -> bool {
                !self.is_hard() && !matches!(self, ReasonCode::OverrideAllow)
            }

            pub fn parse(s: &str) -> Option<Self> {
                match s { $($text => Some(ReasonCode::$variant),)* _ => None }
            }
        }
    };
}

reason_codes! {
    RegionSanctioned = "REGION_SANCTIONED", true,
        "The IP is located in a sanctioned country or subdivision.";
    RegionUnsupported = "REGION_UNSUPPORTED", true,
        "The IP is located in a country or subdivision the service is not offered in.";
    BillingCountryRestricted = "BILLING_COUNTRY_RESTRICTED", true,
        "The account's billing country is on a restricted list.";
    PaymentCountryRestricted = "PAYMENT_COUNTRY_RESTRICTED", true,
        "The payment instrument's issuing country is on a restricted list.";
    PhoneCountryRestricted = "PHONE_COUNTRY_RESTRICTED", true,
        "The account's phone number country is on a restricted list.";
    DeclaredCountryRestricted = "DECLARED_COUNTRY_RESTRICTED", true,
        "The country the account holder declared is on a restricted list.";
    VerifiedCountryRestricted = "VERIFIED_COUNTRY_RESTRICTED", true,
        "A verification the account passed (a phone number, an identity document) is from a country on a restricted list.";
    OwnershipRestricted = "OWNERSHIP_RESTRICTED", true,
        "The organisation is headquartered in, or effectively owned above the policy threshold by entities in, a restricted region.";
    AnonymizerVpn = "ANONYMIZER_VPN", false,
        "The IP belongs to an anonymous VPN service.";
    AnonymizerTor = "ANONYMIZER_TOR", false,
        "The IP is a Tor exit node.";
    AnonymizerPublicProxy = "ANONYMIZER_PUBLIC_PROXY", false,
        "The IP is a public proxy.";
    AnonymizerResidentialProxy = "ANONYMIZER_RESIDENTIAL_PROXY", false,
        "The IP is a residential proxy (traffic relayed through consumer devices).";
    HostingProvider = "HOSTING_PROVIDER", false,
        "The IP belongs to a hosting or cloud provider rather than an access network.";
    CountryMismatch = "COUNTRY_MISMATCH", false,
        "The IP's country differs from one or more of the account's countries.";
    LocaleHintsRestrictedRegion = "LOCALE_HINTS_RESTRICTED_REGION", false,
        "The client's Accept-Language region or time zone points to a restricted region.";
    NewAccount = "NEW_ACCOUNT", false,
        "The account is younger than the policy's new-account age.";
    IpLocationUnknown = "IP_LOCATION_UNKNOWN", false,
        "No database knows the IP's country (private, reserved or unlisted address); the policy's unknown-location setting applies.";
    UsageCountryHopping = "USAGE_COUNTRY_HOPPING", false,
        "The account was used from at least the policy's number of distinct countries in 24 hours.";
    UsageImpossibleTravel = "USAGE_IMPOSSIBLE_TRAVEL", false,
        "The account switched countries faster than the policy's minimum travel time.";
    UsageAnonymizerShare = "USAGE_ANONYMIZER_SHARE", false,
        "At least the policy's share of the account's requests in 24 hours came through anonymizers or hosting.";
    UsageVolumeSpike = "USAGE_VOLUME_SPIKE", false,
        "Requests in the last hour are far above the account's own hourly baseline over 7 days.";
    UsageSharedPayment = "USAGE_SHARED_PAYMENT", false,
        "The payment fingerprint is used by at least the policy's number of accounts.";
    UsageSharedNetwork = "USAGE_SHARED_NETWORK", false,
        "At least the policy's number of accounts used this network prefix (/24 or /48) in 24 hours.";
    UsageRestrictedRegionHistory = "USAGE_RESTRICTED_REGION_HISTORY", false,
        "The account was used from a restricted region in the last 7 days.";
    UsageFleet = "USAGE_FLEET", false,
        "The account belongs to a fleet of at least the policy's number of accounts linked by shared payment fingerprints, API keys, devices, organisation domains, networks or prompt templates.";
    UsageCoordinatedActivity = "USAGE_COORDINATED_ACTIVITY", false,
        "The account's fleet was active in the same minutes of the last hour far more often than chance gives.";
    UsageTemplateRepetition = "USAGE_TEMPLATE_REPETITION", false,
        "One of the account's prompt-template fingerprints was sent by at least the policy's number of accounts in 7 days.";
    OverrideAllow = "OVERRIDE_ALLOW", false,
        "A reviewer's override allows this account, domain or network (it cannot lift a sanctions DENY unless the policy says so), or clears the reasons a fleet raised.";
    OverrideDeny = "OVERRIDE_DENY", true,
        "A reviewer's override denies this account, domain, network or fleet.";
}

impl fmt::Display for ReasonCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_are_upper_snake() {
        for &code in ReasonCode::ALL {
            assert_eq!(ReasonCode::parse(code.as_str()), Some(code));
            assert!(
                code.as_str()
                    .bytes()
                    .all(|b| b.is_ascii_uppercase() || b == b'_')
            );
        }
        assert_eq!(ReasonCode::parse("NOPE"), None);
    }
}

#[cfg(test)]
mod docs {
    use super::ReasonCode;

    #[test]
    fn the_docs_document_every_code() {
        let readme = include_str!("../../docs/policy.md");
        for code in ReasonCode::ALL {
            let kind = if code.is_hard() { "hard" } else { "soft" };
            let row = format!("| `{}` | {kind}", code.as_str());
            assert!(
                readme.contains(&row),
                "docs/policy.md has no row starting {row:?}"
            );
        }
    }
}
