//! The CLI as a new user meets it: what it prints for common mistakes,
//! exactly. No kernel state is needed (every case fails before netlink).

use std::process::Command;

fn run(args: &[&str]) -> (Option<i32>, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_node-shaper"))
        .args(args)
        .output()
        .expect("node-shaper");
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// A guard file in a directory of its own, removed on drop (and on panic).
struct Temp(std::path::PathBuf);

impl Temp {
    fn to_string_lossy(&self) -> String {
        self.0.join("g.yaml").to_string_lossy().into_owned()
    }
}

impl Drop for Temp {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn temp(name: &str, body: &str) -> Temp {
    let dir = std::env::temp_dir().join(format!("egcli-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let t = Temp(dir);
    std::fs::write(t.0.join("g.yaml"), body).expect("write");
    t
}

#[test]
fn a_missing_file_says_why_once() {
    let (code, err) = run(&["plan", "-f", "/nonexistent/eg.yaml"]);
    assert_eq!(code, Some(2));
    assert_eq!(
        err,
        "error: cannot read /nonexistent/eg.yaml: No such file or directory (os error 2)\n"
    );
}

#[test]
fn a_file_of_groups_alone_names_what_is_missing() {
    let p = temp(
        "groups",
        "apiVersion: egressguard.io/v1alpha1\nkind: CIDRGroup\nmetadata: {name: partners}\nspec: {cidrs: [192.0.2.0/24]}\n",
    );
    let (code, err) = run(&["plan", "-f", &p.to_string_lossy()]);
    assert_eq!(code, Some(2));
    assert!(
        err.ends_with("holds no EgressGuard or NodeShaping, only 1 CIDRGroup(s); add the guard that references them\n"),
        "{err}"
    );
}

#[test]
fn a_group_reference_the_file_cannot_resolve_is_named() {
    let p = temp(
        "unresolved",
        "apiVersion: egressguard.io/v1alpha1\nkind: EgressGuard\nmetadata: {name: g}\nspec:\n  uplink: {rate: 20Mbit}\n  throttle: {rate: 1Mbit, destinations: [{port: 443}]}\n  whitelistGroups: [{name: partners}]\n",
    );
    let (code, err) = run(&["plan", "-f", &p.to_string_lossy()]);
    assert_eq!(code, Some(2));
    assert!(
        err.ends_with("EgressGuard \"g\" is invalid:\nspec.whitelistGroups[0].name: CIDRGroup \"partners\" does not exist; create it (kubectl apply -f) or fix the name\n"),
        "{err}"
    );
}

#[test]
fn entries_that_change_nothing_are_warned_about() {
    let p = temp(
        "dups",
        "apiVersion: egressguard.io/v1alpha1\nkind: EgressGuard\nmetadata: {name: g}\nspec:\n  uplink: {rate: 20Mbit}\n  throttle: {rate: 1Mbit, destinations: [{port: 443}]}\n  whitelist: [10.0.0.0/8, 10.0.0.0/8, 10.9.0.0/16]\n",
    );
    let (code, err) = run(&["plan", "-f", &p.to_string_lossy(), "--interface", "eth9"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(
        err,
        "warning: spec.whitelist[1]: 10.0.0.0/8 repeats spec.whitelist[0]\nwarning: spec.whitelist[2]: 10.9.0.0/16 is inside spec.whitelist[0] (10.0.0.0/8); it changes nothing\n"
    );
}
