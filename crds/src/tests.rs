//! Validation and loading, as a table of inputs and the exact messages users see.

use crate::load::parse_str;
use crate::validate::validate;

const GOOD: &str = r#"
apiVersion: egressguard.io/v1alpha1
kind: EgressGuard
metadata: {name: idc-uplink}
spec:
  nodeSelector: {matchLabels: {site: idc-a}}
  interfaces: [enp1s0]
  uplink: {rate: 20Mbit, burst: 15k}
  throttle:
    rate: 1Mbit
    ceil: 1Mbit
    burst: 1k
    destinations:
      - {protocol: TCP, port: 80}
      - {protocol: TCP, port: 443}
      - {protocol: UDP, port: 8000, endPort: 8100}
  whitelist: [203.0.113.10/32, 198.51.100.0/24, 2001:db8:1::/48]
  mode: Enforce
"#;

fn errors_for(patch: &str) -> Vec<String> {
    let mut value: serde_json::Value = serde_yaml::from_str(GOOD).unwrap();
    let patch: serde_json::Value = serde_yaml::from_str(patch).unwrap();
    merge(&mut value, patch);
    let text = serde_yaml::to_string(&value).unwrap();
    match parse_str(&text) {
        Err((_, m)) => m.lines().map(str::to_string).collect(),
        Ok(guards) => match validate(&guards[0].spec) {
            Ok(_) => vec![],
            Err(e) => e.0.iter().map(ToString::to_string).collect(),
        },
    }
}

fn merge(a: &mut serde_json::Value, b: serde_json::Value) {
    match (a, b) {
        (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
            for (k, v) in b {
                merge(a.entry(k).or_insert(serde_json::Value::Null), v);
            }
        }
        (a, b) => *a = b,
    }
}

#[test]
fn the_incident_guard_is_valid() {
    let guards = parse_str(GOOD).unwrap();
    let v = validate(&guards[0].spec).unwrap();
    assert_eq!(v.uplink_rate.bits_per_sec(), 20_000_000);
    assert_eq!(v.uplink_burst.map(|b| b.bytes()), Some(15360));
    assert_eq!(v.throttle_ceil.bits_per_sec(), 1_000_000);
    assert_eq!(v.destinations.len(), 3);
    assert_eq!(
        (v.destinations[2].first, v.destinations[2].last),
        (8000, 8100)
    );
    assert_eq!(v.whitelist.len(), 3);
}

#[test]
fn lanes_default_to_guarantees_that_fit_the_uplink() {
    let lanes = |patch: &str| {
        let mut value: serde_json::Value = serde_yaml::from_str(GOOD).unwrap();
        merge(&mut value, serde_yaml::from_str(patch).unwrap());
        let guards = parse_str(&serde_yaml::to_string(&value).unwrap()).unwrap();
        let v = validate(&guards[0].spec).unwrap();
        [
            v.protected_lane.rate,
            v.protected_lane.ceil,
            v.ssh_lane.rate,
            v.ssh_lane.ceil,
        ]
        .map(|r| r.bits_per_sec())
    };
    const M: u64 = 1_000_000;
    // 20 Mbit: protected max(1Mbit, 2Mbit) up to the uplink; SSH 1Mbit up to 5Mbit.
    assert_eq!(lanes("{}"), [2 * M, 20 * M, M, 5 * M]);
    // 1 Gbit: a tenth each.
    assert_eq!(
        lanes("spec: {uplink: {rate: 1gbit}}"),
        [100 * M, 1000 * M, M, 100 * M]
    );
    // 2 Mbit, 1 Mbit throttled: each guarantee shrinks to a quarter of the
    // 1 Mbit left; SSH's ceiling is the whole uplink.
    assert_eq!(
        lanes("spec: {uplink: {rate: 2mbit, burst: null}, throttle: {burst: null}}"),
        [M / 4, 2 * M, M / 4, 2 * M]
    );
    // Given values win; a rate above the default ceiling lifts it.
    assert_eq!(
        lanes("spec: {lanes: {protected: {rate: 3mbit, ceil: 10mbit}, ssh: {rate: 6mbit}}}"),
        [3 * M, 10 * M, 6 * M, 6 * M]
    );
}

#[test]
fn a_quarantine_throttles_all_but_the_whitelist_unless_told_otherwise() {
    let throttle_all = |patch: &str| {
        let mut value: serde_json::Value = serde_yaml::from_str(GOOD).unwrap();
        merge(&mut value, serde_yaml::from_str(patch).unwrap());
        let guards = parse_str(&serde_yaml::to_string(&value).unwrap()).unwrap();
        validate(&guards[0].spec).unwrap().throttle_all
    };
    let auto = "spec: {mode: Auto, quarantine: {triggers: [{name: a, alertmanager: {matchers: {alertname: X}}}]}}";
    assert!(throttle_all(auto));
    assert!(!throttle_all(
        &auto.replace("triggers:", "throttle: ListedPorts, triggers:")
    ));
    assert!(throttle_all(
        &auto.replace("triggers:", "throttle: AllButWhitelisted, triggers:")
    ));
    // Enforce throttles what it lists, always.
    assert!(!throttle_all("{}"));
}

#[test]
fn bad_inputs_name_the_field_and_the_fix() {
    let table: &[(&str, &[&str])] = &[
        (
            "spec: {throttle: {destinations: [{port: 80}, {port: 443}, {protocol: UDP, port: 8000, endPort: 70000}]}}",
            &["spec.throttle.destinations[2].endPort: 70000 is above 65535"],
        ),
        (
            "spec: {throttle: {destinations: [{port: 0}]}}",
            &["spec.throttle.destinations[0].port: 0 is below 1"],
        ),
        (
            "spec: {throttle: {destinations: [{port: 443, endPort: 80}]}}",
            &["spec.throttle.destinations[0].endPort: 80 is below port 443; endPort is the last port of an inclusive range"],
        ),
        (
            "spec: {throttle: {destinations: []}}",
            &["spec.throttle.destinations: is empty; list at least one destination, e.g. {protocol: TCP, port: 443}"],
        ),
        (
            "spec: {uplink: {rate: 20mbps}}",
            &["spec.uplink.rate: \"20mbps\" uses \"mbps\", which tc reads as bytes per second (160000000 bit/s); if you meant bits per second write \"20mbit\""],
        ),
        ("spec: {uplink: {rate: 0mbit}}", &["spec.uplink.rate: must be greater than 0"]),
        (
            "spec: {lanes: {ssh: {rate: 2mbit, ceil: 1mbit}}}",
            &["spec.lanes.ssh.ceil: 1mbit is below the lane's rate (2mbit); ceil must be at least rate"],
        ),
        (
            "spec: {lanes: {protected: {ceil: 30mbit}}}",
            &["spec.lanes.protected.ceil: 30mbit is above spec.uplink.rate (20mbit); no lane can exceed the uplink"],
        ),
        (
            "spec: {lanes: {protected: {rate: 15mbit}, ssh: {rate: 4mbit}}}",
            &["spec.lanes: the guarantees (protected 15mbit + ssh 4mbit + spec.throttle.rate 1mbit) leave nothing of spec.uplink.rate (20mbit) for whitelisted and ordinary traffic; lower them or raise the uplink"],
        ),
        (
            "spec: {lanes: {ssh: {rate: fast}}}",
            &["spec.lanes.ssh.rate: \"fast\" does not start with a number; write e.g. 20Mbit"],
        ),
        (
            "spec: {throttle: {rate: 2mbit, ceil: 1mbit}}",
            &["spec.throttle.ceil: 1mbit is below spec.throttle.rate (2mbit); ceil must be at least rate"],
        ),
        (
            "spec: {throttle: {ceil: 30mbit}}",
            &["spec.throttle.ceil: 30mbit is above spec.uplink.rate (20mbit); throttled traffic cannot exceed the uplink"],
        ),
        (
            "spec: {throttle: {rate: 20mbit, ceil: 20mbit}}",
            &["spec.throttle.rate: 20mbit must be below spec.uplink.rate (20mbit) so ordinary and whitelisted traffic keep a share of the uplink"],
        ),
        (
            // A typo that would starve the node's own traffic.
            "spec: {uplink: {rate: 16bit, burst: null}, throttle: {rate: 8bit, ceil: 8bit, burst: null}}",
            &["spec.uplink.rate: 16bit is below the 1Mbit floor: an uplink that small starves the node's own traffic; set at least 1Mbit"],
        ),
        (
            "spec: {protect: [{cidr: 192.0.2.1/32, protocol: UDP}, {cidr: 192.0.2.2/32, port: 53, endPort: 52}, {cidr: 192.0.2.3/32, port: 0}]}",
            &[
                "spec.protect[0].port: is required with protocol or endPort; omit all three to protect every packet to the destination",
                "spec.protect[1].endPort: 52 is below port 53; endPort is the last port of an inclusive range",
                "spec.protect[2].port: 0 is below 1",
            ],
        ),
        (
            "spec: {protect: [{cidr: 192.0.2.1/24}]}",
            &["spec.protect[0].cidr: 192.0.2.1/24 has host bits set; the network is 192.0.2.0/24"],
        ),
        (
            "spec: {throttle: {portless: Drop}}",
            &["spec.throttle.portless: unknown variant `Drop`, expected `Throttle` or `Pass`"],
        ),
        (
            "spec: {whitelist: [198.51.100.7/24]}",
            &["spec.whitelist[0]: 198.51.100.7/24 has host bits set; the network is 198.51.100.0/24"],
        ),
        (
            "spec: {whitelist: [10.0.0.0/8, 'example.com', 2001:db8::1/32]}",
            &[
                "spec.whitelist[1]: \"example.com\" is not a CIDR; write an address and prefix length such as 203.0.113.0/24 or 2001:db8::/48",
                "spec.whitelist[2]: 2001:db8::1/32 has host bits set; the network is 2001:db8::/32",
            ],
        ),
        ("spec: {uplink: {burst: 15kbit}}", &["spec.uplink.burst: \"15kbit\" has unknown unit \"kbit\"; use one of b, k/kb, m/mb, g/gb"]),
        ("spec: {interfaces: [eth0, eth0]}", &["spec.interfaces[1]: \"eth0\" is listed twice"]),
        (
            "spec: {interfaces: [averyveryverylongname0]}",
            &["spec.interfaces[0]: \"averyveryverylongname0\" is longer than 15 bytes, the kernel's limit for interface names"],
        ),
        (
            "spec: {throttle: {destinations: [{protocol: SCTP, port: 1}]}}",
            &["spec.throttle.destinations[0].protocol: unknown variant `SCTP`, expected one of `TCP`, `UDP`, `Any`"],
        ),
        (
            "spec: {throttle: {destinations: [{port: https}]}}",
            &["spec.throttle.destinations[0].port: invalid type: string \"https\", expected i64"],
        ),
        ("spec: {whitlist: [10.0.0.0/8]}", &["spec.whitlist: unknown field; did you mean `whitelist`?"]),
        ("spec: {shaper: 1}", &["spec.shaper: unknown field; check its spelling against the API reference"]),
        // Several problems are reported together, in field order.
        (
            "spec: {uplink: {rate: fast}, throttle: {rate: 1mbps, destinations: [{port: 99999}]}, whitelist: [300.1.1.1/32]}",
            &[
                "spec.uplink.rate: \"fast\" does not start with a number; write e.g. 20Mbit",
                "spec.throttle.rate: \"1mbps\" uses \"mbps\", which tc reads as bytes per second (8000000 bit/s); if you meant bits per second write \"1mbit\"",
                "spec.throttle.destinations[0].port: 99999 is above 65535",
                "spec.whitelist[0]: \"300.1.1.1/32\" is not a CIDR; write an address and prefix length such as 203.0.113.0/24 or 2001:db8::/48",
            ],
        ),
    ];
    for (patch, want) in table {
        let got = errors_for(patch);
        let want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
        assert_eq!(got, want, "for patch {patch}");
    }
}

#[test]
fn bare_addresses_are_host_routes_and_defaults_apply() {
    let text = GOOD
        .replace("203.0.113.10/32", "203.0.113.10")
        .replace("    ceil: 1Mbit\n", "");
    let g = parse_str(&text).unwrap();
    let v = validate(&g[0].spec).unwrap();
    assert_eq!(v.whitelist[0].net.to_string(), "203.0.113.10/32");
    assert_eq!(v.throttle_ceil, v.throttle_rate);
    assert_eq!(
        g[0].spec.throttle.destinations[0].protocol,
        crate::Protocol::Tcp
    );
}

#[test]
fn wrong_api_version_is_named() {
    let text = GOOD.replace("egressguard.io/v1alpha1", "egressguard.io/v1");
    assert_eq!(
        parse_str(&text).unwrap_err(),
        (
            1,
            "apiVersion: \"egressguard.io/v1\" is not served; use egressguard.io/v1alpha1"
                .to_string()
        )
    );
}

const AUTO: &str = "spec: {mode: Auto, quarantine: {triggers: [{name: uplink, prometheus: {query: 'sum by (node) (x)', above: 15e6, for: 2m}}, {name: alert, alertmanager: {matchers: {alertname: NodeEgressSaturated}}}], release: {after: 30m, below: 10e6}, limits: {maxQuarantinedNodes: '10%', cooldown: 10m}}}";

#[test]
fn the_quarantine_policy_parses_into_rules() {
    use crate::quarantine::{rules, Cap, TriggerRule};
    assert!(errors_for(AUTO).is_empty(), "{:?}", errors_for(AUTO));
    let mut value: serde_json::Value = serde_yaml::from_str(GOOD).unwrap();
    merge(&mut value, serde_yaml::from_str(AUTO).unwrap());
    let g = parse_str(&serde_yaml::to_string(&value).unwrap()).unwrap();
    let r = rules(g[0].spec.quarantine.as_ref(), g[0].spec.mode)
        .unwrap()
        .unwrap();
    assert_eq!(r.release_after, Some(std::time::Duration::from_secs(1800)));
    assert_eq!(r.cooldown, std::time::Duration::from_secs(600));
    assert_eq!(r.cap, Cap::Percent(10));
    // 10% of 5 nodes rounds down to 0: the cap never drops below one node.
    assert_eq!((r.cap.of(5), r.cap.of(40)), (1, 4));
    match &r.triggers[0].1 {
        TriggerRule::Prometheus {
            threshold,
            calm,
            hold,
            above,
            ..
        } => assert_eq!(
            (*threshold, *calm, hold.as_secs(), *above),
            (15e6, 10e6, 120, true)
        ),
        other => panic!("{other:?}"),
    }
}

#[test]
fn bad_quarantine_policies_name_the_field_and_the_fix() {
    let table: &[(&str, &[&str])] = &[
        ("spec: {mode: Auto}", &["spec.quarantine: is required when spec.mode is Auto: list at least one trigger, or use mode Enforce to throttle every selected node"]),
        ("spec: {quarantine: {triggers: [{name: a, alertmanager: {matchers: {alertname: X}}}]}}", &["spec.quarantine: only applies in mode Auto (or DryRun, to report what it would do); mode Enforce throttles every selected node already"]),
        ("spec: {mode: Auto, quarantine: {triggers: []}}", &["spec.quarantine.triggers: is empty; add a prometheus or alertmanager trigger"]),
        ("spec: {mode: Auto, quarantine: {triggers: [{name: a}]}}", &["spec.quarantine.triggers[0]: set exactly one of `prometheus` and `alertmanager`"]),
        ("spec: {mode: Auto, quarantine: {triggers: [{name: a, prometheus: {query: ' ', above: 1, below: 2, for: 2 minutes}}]}}", &[
            "spec.quarantine.triggers[0].prometheus.query: is empty; write a PromQL query returning one series per node",
            "spec.quarantine.triggers[0].prometheus: set exactly one of `above` and `below`",
            "spec.quarantine.triggers[0].prometheus.for: \"2 minutes\" is not a duration; write a number and a unit (ms, s, m, h), e.g. 30s, 2m or 1h30m",
        ]),
        ("spec: {mode: Auto, quarantine: {triggers: [{name: a, alertmanager: {matchers: {alertname: X}}}, {name: a, alertmanager: {matchers: {alertname: Y}}}]}}", &["spec.quarantine.triggers[1].name: \"a\" is used by an earlier trigger; names must be unique"]),
        ("spec: {mode: Auto, quarantine: {triggers: [{name: manual, alertmanager: {matchers: {}}}]}}", &[
            "spec.quarantine.triggers[0].name: \"manual\" must be 1 to 63 characters and not `manual` (reserved for people)",
            "spec.quarantine.triggers[0].alertmanager.matchers: is empty; match at least the alert name, e.g. {alertname: NodeEgressSaturated}",
        ]),
        ("spec: {mode: Auto, quarantine: {triggers: [{name: a, alertmanager: {matchers: {alertname: X}}}], release: {after: soon}, limits: {maxQuarantinedNodes: 0, cooldown: '5'}}}", &[
            "spec.quarantine.release.after: \"soon\" is not a duration; write a number and a unit (ms, s, m, h), e.g. 30s, 2m or 1h30m, or `manual`",
            "spec.quarantine.limits.cooldown: \"5\" is not a duration; write a number and a unit (ms, s, m, h), e.g. 30s, 2m or 1h30m",
            "spec.quarantine.limits.maxQuarantinedNodes: 0 must be at least 1; pause the guard (spec.quarantine.paused) to stop new quarantines",
        ]),
        ("spec: {mode: Auto, quarantine: {triggers: [{name: a, prometheus: {query: q, above: 5}}], release: {below: 9}, limits: {maxQuarantinedNodes: 'half'}}}", &[
            "spec.quarantine.limits.maxQuarantinedNodes: \"half\" is neither a number of nodes nor a percentage from 1% to 100%",
            "spec.quarantine.release.below: 9 is above trigger \"a\"'s threshold 5; the calm threshold must not exceed the breach threshold",
        ]),
    ];
    for (patch, want) in table {
        let got = errors_for(patch);
        let want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
        assert_eq!(got, want, "for patch {patch}");
    }
}

/// What the controller would refuse, the offline validation refuses too:
/// selector operators and values, and group references.
#[test]
fn selectors_and_group_references_are_validated_offline() {
    let table: &[(&str, &[&str])] = &[
        ("spec: {nodeSelector: {matchExpressions: [{key: site, operator: Matches, values: [a]}]}}", &[
            "spec.nodeSelector.matchExpressions[0].operator: \"Matches\" is not one of In, NotIn, Exists, DoesNotExist",
        ]),
        ("spec: {nodeSelector: {matchExpressions: [{key: site, operator: In}, {key: gpu, operator: Exists, values: [x]}]}}", &[
            "spec.nodeSelector.matchExpressions[0].values: must not be empty for operator In",
            "spec.nodeSelector.matchExpressions[1].values: must be empty for operator Exists",
        ]),
        ("spec: {whitelistGroups: [{}, {name: ''}, {selector: {matchExpressions: [{key: a, operator: Near}]}}]}", &[
            "spec.whitelistGroups[0]: set exactly one of name (one group) and selector (groups by label)",
            "spec.whitelistGroups[1].name: must not be empty",
            "spec.whitelistGroups[2].selector.matchExpressions[0].operator: \"Near\" is not one of In, NotIn, Exists, DoesNotExist",
        ]),
    ];
    for (patch, want) in table {
        let got = errors_for(patch);
        let want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
        assert_eq!(got, want, "for patch {patch}");
    }
}

/// A misspelt required field names the typo and the field it was meant to
/// be, not only the field that is missing.
#[test]
fn a_misspelt_required_field_is_named_with_its_suggestion() {
    let text = "apiVersion: egressguard.io/v1alpha1\nkind: EgressGuard\nmetadata: {name: g}\nspec:\n  uplnk: {rate: 20Mbit}\n  throttle: {rate: 1Mbit, destinations: [{port: 443, endprt: 444}]}\n";
    let (doc, msg) = parse_str(text).expect_err("invalid");
    assert_eq!(doc, 1);
    assert_eq!(
        msg,
        "spec: missing field `uplink`\nspec.throttle.destinations[0].endprt: unknown field; did you mean `endPort`?\nspec.uplnk: unknown field; did you mean `uplink`?"
    );
}

/// tc reads a bare number as bits per second (rates) and bytes (sizes);
/// a YAML integer means the same here.
#[test]
fn bare_numbers_are_tc_quantities() {
    let text = "apiVersion: egressguard.io/v1alpha1\nkind: EgressGuard\nmetadata: {name: g}\nspec:\n  uplink: {rate: 20000000, burst: 1600}\n  throttle: {rate: 1Mbit, ceil: 2000000.5, burst: 3000, destinations: [{port: 443}]}\n";
    let g = parse_str(text).expect("parses").remove(0);
    let v = validate(&g.spec).expect("valid");
    assert_eq!(v.uplink_rate.bits_per_sec(), 20_000_000);
    assert_eq!(v.uplink_burst.map(|b| b.bytes()), Some(1600));
    assert_eq!(v.throttle_burst.map(|b| b.bytes()), Some(3000));
    assert_eq!(v.throttle_ceil.bits_per_sec(), 2_000_001);
    let e = parse_str(&text.replace("burst: 1600", "burst: [1600]")).expect_err("a list");
    assert_eq!(
        e.1,
        "spec.uplink.burst: invalid type: sequence, expected a tc quantity such as 20Mbit or 15k, or a bare number"
    );
}

/// Whitelisting everything is refused unless meant; entries that change
/// nothing are warned about, naming both.
#[test]
fn whole_families_are_refused_and_useless_entries_warned() {
    let errs = errors_for("spec: {whitelist: [0.0.0.0/0, '::/0']}");
    assert_eq!(
        errs,
        [
            "spec.whitelist[0]: 0.0.0.0/0 is every IPv4 destination, so the guard would throttle nothing there; remove it, or set spec.whitelistAllDestinations: true if that is meant",
            "spec.whitelist[1]: ::/0 is every IPv6 destination, so the guard would throttle nothing there; remove it, or set spec.whitelistAllDestinations: true if that is meant",
        ]
    );
    assert!(
        errors_for("spec: {whitelist: [0.0.0.0/0], whitelistAllDestinations: true}").is_empty()
    );
    let group = crate::CidrGroupSpec {
        cidrs: vec!["::/0".into()],
    };
    assert!(group
        .validate()
        .expect_err("refused")
        .to_string()
        .starts_with("spec.cidrs[0]: ::/0 is every destination of its family"));

    let g = parse_str(&GOOD.replace(
        "whitelist: [203.0.113.10/32, 198.51.100.0/24, 2001:db8:1::/48]",
        "whitelist: [10.0.0.0/8, 10.1.2.0/24, 10.0.0.0/8, 192.0.2.7/32]",
    ))
    .expect("parse")
    .remove(0);
    let mut v = validate(&g.spec).expect("valid");
    v.add_group(
        "partners",
        &[
            "192.0.2.0/24".parse().expect("net"),
            "192.0.2.7/32".parse().expect("net"),
        ],
    );
    assert_eq!(
        crate::validate::whitelist_warnings(&v),
        [
            "spec.whitelist[2]: 10.0.0.0/8 repeats spec.whitelist[0]",
            "CIDRGroup partners[1]: 192.0.2.7/32 repeats spec.whitelist[3]",
            "spec.whitelist[1]: 10.1.2.0/24 is inside spec.whitelist[0] (10.0.0.0/8); it changes nothing",
            "spec.whitelist[3]: 192.0.2.7/32 is inside CIDRGroup partners[0] (192.0.2.0/24); it changes nothing",
        ]
    );
}

fn valid_with(patch: &str) -> crate::ValidSpec {
    let mut value: serde_json::Value = serde_yaml::from_str(GOOD).unwrap();
    merge(&mut value, serde_yaml::from_str(patch).unwrap());
    let guards = parse_str(&serde_yaml::to_string(&value).unwrap()).unwrap();
    validate(&guards[0].spec).unwrap()
}

const WIDE_V4: &str = "spec.whitelist: the entries cover 100% of all IPv4 addresses (overlaps merged), so the guard would throttle almost nothing there; remove the widest entries, or set spec.allowWideRanges: true if exempting that much is meant";

/// Inputs that cannot widen or starve (#19): a whitelist covering half an
/// address family, a protect entry without ports exempting a large network,
/// loopback as a shaped interface. The first two are accepted with
/// spec.allowWideRanges; loopback never is.
#[test]
fn wide_ranges_and_loopback_are_refused() {
    let table: &[(&str, &[&str])] = &[
        ("spec: {whitelist: [0.0.0.0/1, 128.0.0.0/1]}", &[WIDE_V4]),
        (
            "spec: {whitelist: [0.0.0.0/1]}",
            &["spec.whitelist: the entries cover 50% of all IPv4 addresses (overlaps merged), so the guard would throttle almost nothing there; remove the widest entries, or set spec.allowWideRanges: true if exempting that much is meant"],
        ),
        // Overlaps are merged: 2^31 + 2^24 listed, exactly half covered.
        (
            "spec: {whitelist: [0.0.0.0/2, 10.0.0.0/8, 64.0.0.0/2]}",
            &["spec.whitelist: the entries cover 50% of all IPv4 addresses (overlaps merged), so the guard would throttle almost nothing there; remove the widest entries, or set spec.allowWideRanges: true if exempting that much is meant"],
        ),
        (
            "spec: {whitelist: ['::/1', '8000::/2', 'c000::/2']}",
            &["spec.whitelist: the entries cover 100% of all IPv6 addresses (overlaps merged), so the guard would throttle almost nothing there; remove the widest entries, or set spec.allowWideRanges: true if exempting that much is meant"],
        ),
        // whitelistAllDestinations lets /0 in, for its family only.
        (
            "spec: {whitelist: [0.0.0.0/0, '::/1'], whitelistAllDestinations: true}",
            &["spec.whitelist: the entries cover 50% of all IPv6 addresses (overlaps merged), so the guard would throttle almost nothing there; remove the widest entries, or set spec.allowWideRanges: true if exempting that much is meant"],
        ),
        (
            "spec: {protect: [{cidr: 10.0.0.0/8}, {cidr: '2001:db8::/32', reason: lab}, {cidr: 0.0.0.0/0}]}",
            &[
                "spec.protect[0].cidr: 10.0.0.0/8 has no port and is wider than /16, so every packet to it would skip the throttle in the protected lane; narrow it to /16 or longer, add a port, or set spec.allowWideRanges: true if exempting that much is meant",
                "spec.protect[1].cidr: 2001:db8::/32 has no port and is wider than /48, so every packet to it would skip the throttle in the protected lane; narrow it to /48 or longer, add a port, or set spec.allowWideRanges: true if exempting that much is meant",
                "spec.protect[2].cidr: 0.0.0.0/0 has no port and is wider than /16, so every packet to it would skip the throttle in the protected lane; narrow it to /16 or longer, add a port, or set spec.allowWideRanges: true if exempting that much is meant",
            ],
        ),
        (
            "spec: {interfaces: [enp1s0, lo]}",
            &["spec.interfaces[1]: \"lo\" is the loopback interface: shaping it throttles the node's own processes talking to each other (the kubelet, local databases, this agent); remove it and list the uplink interfaces"],
        ),
        (
            "spec: {interfaces: [lo], allowWideRanges: true}",
            &["spec.interfaces[0]: \"lo\" is the loopback interface: shaping it throttles the node's own processes talking to each other (the kubelet, local databases, this agent); remove it and list the uplink interfaces"],
        ),
    ];
    for (patch, want) in table {
        let got = errors_for(patch);
        let want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
        assert_eq!(got, want, "for patch {patch}");
    }
    let accepted = [
        // The opt-in.
        "spec: {whitelist: [0.0.0.0/1, 128.0.0.0/1, '::/1'], allowWideRanges: true}",
        "spec: {protect: [{cidr: 10.0.0.0/8}, {cidr: '2001:db8::/32'}], allowWideRanges: true}",
        "spec: {whitelist: [0.0.0.0/0], whitelistAllDestinations: true}",
        // Ordinary whitelists: a /8, a few /16s, a /32 of IPv6.
        "spec: {whitelist: [10.0.0.0/8, 172.16.0.0/16, 172.17.0.0/16, 192.168.0.0/16, '2001:db8::/32']}",
        // 2^31 listed, 2^30 covered once overlaps are merged.
        "spec: {whitelist: [0.0.0.0/2, 0.0.0.0/3, 32.0.0.0/3]}",
        // Just under half.
        "spec: {whitelist: [0.0.0.0/2, 64.0.0.0/3, 96.0.0.0/4, 112.0.0.0/5]}",
        // Wide networks with ports, and /16 or /48 without.
        "spec: {protect: [{cidr: 10.0.0.0/8, protocol: UDP, port: 53}, {cidr: 10.1.0.0/16}, {cidr: '2001:db8:1::/48'}]}",
        "spec: {interfaces: [enp1s0, lo0]}",
    ];
    for patch in accepted {
        assert_eq!(errors_for(patch), Vec::<String>::new(), "for patch {patch}");
    }
}

/// Entries of CIDRGroups count as the guard's own: an entry wider than /8
/// (IPv4) or /16 (IPv6) is refused naming the group and the index, and the
/// union check counts the groups' entries, unless the guard opts in.
#[test]
fn cidr_groups_cannot_widen_a_guard_unless_allowed() {
    use crate::cidr_group::check_resolved;
    let nets = |s: &[&str]| -> Vec<ipnet::IpNet> { s.iter().map(|n| n.parse().unwrap()).collect() };
    let guard = valid_with("{}");
    let errors = |guard: &crate::ValidSpec, groups: &[(&str, &[ipnet::IpNet])]| {
        // Both entry points give the same errors.
        let mut with = guard.clone();
        for (g, n) in groups {
            with.add_group(g, n);
        }
        let direct = check_resolved(guard, groups).err().unwrap_or_default();
        assert_eq!(with.wide_group_problems(), direct);
        direct.iter().map(ToString::to_string).collect::<Vec<_>>()
    };

    let wide = nets(&["192.0.2.0/24", "1.0.0.0/7", "2001::/15", "10.0.0.0/8"]);
    assert_eq!(
        errors(&guard, &[("partners", &wide)]),
        [
            "CIDRGroup partners: spec.cidrs[1]: 1.0.0.0/7 is wider than /8, so every guard using the group would exempt it from its throttle; narrow it to /8 or longer, or set spec.allowWideRanges: true on the guard if exempting that much is meant",
            "CIDRGroup partners: spec.cidrs[2]: 2001::/15 is wider than /16, so every guard using the group would exempt it from its throttle; narrow it to /16 or longer, or set spec.allowWideRanges: true on the guard if exempting that much is meant",
        ]
    );

    // 128 /8s, each acceptable, in two groups: half of IPv4 together.
    let low: Vec<String> = (0..64).map(|i| format!("{i}.0.0.0/8")).collect();
    let high: Vec<String> = (64..128).map(|i| format!("{i}.0.0.0/8")).collect();
    let low = nets(&low.iter().map(String::as_str).collect::<Vec<_>>());
    let high = nets(&high.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(
        errors(&guard, &[("cdn", &low), ("payments", &high)]),
        ["spec.whitelistGroups: with CIDRGroups cdn, payments the whitelist covers 50% of all IPv4 addresses (overlaps merged), so the guard would throttle almost nothing there; narrow the groups or reference fewer of them, or set spec.allowWideRanges: true if exempting that much is meant"]
    );
    assert!(errors(&guard, &[("cdn", &low)]).is_empty());
    // The guard's own entries count with the group's.
    let own = valid_with("spec: {whitelist: [64.0.0.0/2]}");
    assert_eq!(
        errors(&own, &[("cdn", &low)]),
        ["spec.whitelistGroups: with CIDRGroups cdn the whitelist covers 50% of all IPv4 addresses (overlaps merged), so the guard would throttle almost nothing there; narrow the groups or reference fewer of them, or set spec.allowWideRanges: true if exempting that much is meant"]
    );

    // A long list of wide entries names the first 20 and counts the rest.
    let many: Vec<String> = (0..25).map(|i| format!("{}.0.0.0/7", 2 * i)).collect();
    let many = nets(&many.iter().map(String::as_str).collect::<Vec<_>>());
    let got = errors(&guard, &[("big", &many)]);
    assert_eq!(got.len(), 21, "{got:?}");
    assert!(got[19].starts_with("CIDRGroup big: spec.cidrs[19]: 38.0.0.0/7 is wider than /8"));
    assert_eq!(
        got[20],
        "CIDRGroup big: spec.cidrs: and 5 more entries wider than /8 (IPv4) or /16 (IPv6)"
    );

    // The opt-in accepts all of it; ordinary groups pass without it.
    let allowed = valid_with("spec: {allowWideRanges: true}");
    assert!(errors(
        &allowed,
        &[("partners", &wide), ("cdn", &low), ("payments", &high)]
    )
    .is_empty());
    let ordinary = nets(&[
        "172.16.0.0/16",
        "172.17.0.0/16",
        "198.51.100.0/24",
        "2001:db8::/32",
    ]);
    assert!(errors(&guard, &[("partners", &ordinary)]).is_empty());
}

#[test]
fn parse_errors_are_typed_and_keep_their_messages() {
    use crate::duration::{parse_duration, DurationError};
    use crate::net::{parse_cidr, CidrError};
    use crate::selector::{selects, SelectorError};

    let e = parse_cidr(" 10.0.0.1/8 ").unwrap_err();
    assert!(matches!(e, CidrError::HostBitsSet { .. }));
    assert_eq!(
        e.to_string(),
        "10.0.0.1/8 has host bits set; the network is 10.0.0.0/8"
    );
    let e = parse_cidr("nope").unwrap_err();
    assert!(matches!(e, CidrError::NotACidr { .. }));

    let e = parse_duration(" 2d").unwrap_err();
    assert!(matches!(e, DurationError::NotADuration { .. }));
    assert_eq!(
        e.to_string(),
        "\" 2d\" is not a duration; write a number and a unit (ms, s, m, h), e.g. 30s, 2m or 1h30m"
    );
    let e = parse_duration("9000h").unwrap_err();
    assert_eq!(e.to_string(), "\"9000h\" is longer than a year");

    let sel = k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector {
        match_expressions: Some(vec![
            k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement {
                key: "site".into(),
                operator: "Matches".into(),
                values: None,
            },
        ]),
        ..Default::default()
    };
    let e = selects(&sel, &Default::default()).unwrap_err();
    assert_eq!(
        e,
        SelectorError::UnknownOperator {
            index: 0,
            operator: "Matches".into()
        }
    );
    assert_eq!(
        e.to_string(),
        "matchExpressions[0].operator: \"Matches\" is not one of In, NotIn, Exists, DoesNotExist"
    );
}
