use super::*;

fn files(list: &[(&str, &str)]) -> Vec<(PathBuf, String)> {
    list.iter().map(|(n, t)| (PathBuf::from(format!("policies/{n}")), t.to_string())).collect()
}

fn parse(defaults: &str, list: &[(&str, &str)]) -> Result<PolicySet, PolicyErrors> {
    PolicySet::parse((Path::new("policies/_defaults.toml"), defaults), &files(list))
}

fn t(s: &str) -> TenantId {
    TenantId::new(s).expect("tenant")
}

fn errors(defaults: &str, list: &[(&str, &str)]) -> Vec<String> {
    parse(defaults, list).expect_err("refused").0.iter().map(ToString::to_string).collect()
}

#[test]
fn tenants_inherit_defaults_and_override_them() {
    let set = parse(
        "enabled = true\n",
        &[("acme.toml", "tenant = \"acme\"\n"), ("globex.toml", "tenant = \"globex\"\nenabled = false\n")],
    )
    .expect("valid");
    assert_eq!(set.admit(&t("acme")), Admission::Allowed);
    assert_eq!(set.admit(&t("globex")), Admission::Disabled);
    assert_eq!(set.admit(&t("initech")), Admission::UnknownTenant);
    let off = parse("enabled = false\n", &[("acme.toml", "tenant = \"acme\"\n")]).expect("valid");
    assert_eq!(off.admit(&t("acme")), Admission::Disabled);
}

#[test]
fn limits_merge_key_by_key() {
    let set = parse(
        "[limits]\nmax_connections = 50\nmessages_per_second = 7\n",
        &[("acme.toml", "tenant = \"acme\"\n[limits]\nmessages_per_second = 3\npublish_burst = 9\n")],
    )
    .expect("valid");
    let l = set.get(&t("acme")).expect("acme").limits;
    assert_eq!(l.max_connections, 50, "from the defaults file");
    assert_eq!(l.messages_per_second, 3, "the tenant's own");
    assert_eq!(l.publish_burst, 9);
    assert_eq!(l.message_burst, Limits::default().message_burst, "built in");
}

#[test]
fn lists_labels_origins_and_revocations() {
    let set = parse(
        "allowed_origins = [\"https://console.example.com\"]\n[mandatory_labels]\ntenant = \"tenant\"\nteam = \"team\"\n",
        &[
            (
                "acme.toml",
                "tenant = \"acme\"\nallowed_event_types = [\"escalated\", \"incident_resolved\"]\n\
                 allowed_origins = [\"HTTPS://App.Acme.example/\"]\nrevoked_subjects = [\"mallory\"]\n\
                 revoked_token_ids = [\"t-1\"]\n[mandatory_labels]\nregion = \"region\"\n",
            ),
            ("globex.toml", "tenant = \"globex\"\n"),
        ],
    )
    .expect("valid");
    let acme = set.get(&t("acme")).expect("acme");
    assert!(acme.allows_event_type(EventType::Escalated));
    assert!(!acme.allows_event_type(EventType::IncidentCreated));
    assert_eq!(acme.allowed_event_type_names(), vec!["incident_resolved", "escalated"]);
    assert!(acme.allows_origin(None), "no Origin: not a browser");
    assert!(acme.allows_origin(Some("https://app.acme.example")));
    assert!(!acme.allows_origin(Some("https://console.example.com")), "the tenant's list replaces the default");
    assert!(!acme.allows_origin(Some("https://evil.example")));
    let labels: Vec<_> = acme.mandatory_labels.iter().map(|(l, c)| format!("{l}={c}")).collect();
    assert_eq!(labels, vec!["region=region", "team=team"], "maps merge key by key; tenant is implicit");
    assert_eq!(set.admit_principal(&t("acme"), "mallory", "x"), Admission::SubjectRevoked);
    assert_eq!(set.admit_principal(&t("acme"), "bob", "t-1"), Admission::TokenRevoked);
    assert_eq!(set.admit_principal(&t("acme"), "bob", "t-2"), Admission::Allowed);
    let globex = set.get(&t("globex")).expect("globex");
    assert!(globex.allows_origin(Some("https://console.example.com")));
    assert!(globex.allows_event_type(EventType::IncidentCreated), "no list: every type");
    assert_eq!(set.file_hashes().len(), 3);
    assert_eq!(set.file_hashes()[1].0, "acme.toml");
    assert_eq!(set.file_hashes()[1].1.len(), 64);
}

#[test]
fn bad_files_are_named_with_line_and_key() {
    type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a [&'a str]);
    let cases: &[Case] = &[
        ("enabled = true\nbogus = 1\n", &[], &["_defaults.toml", "bogus", "line 2"]),
        ("", &[("acme.toml", "tenant = \"acme\"\ncolour = \"red\"\n")], &["acme.toml", "colour"]),
        ("", &[("acme.toml", "tenant = \"acme\"\n[limits]\nmax_conections = 3\n")], &["max_conections", "line 3"]),
        ("", &[("acme.toml", "tenant = \"acme\"\nenabled = \"yes\"\n")], &["line 2"]),
        ("", &[("acme.toml", "tenant = \"globex\"\n")], &["line 1", "does not match"]),
        ("", &[("acme.toml", "enabled = true\n")], &["acme.toml", "`tenant`: missing"]),
        ("", &[("a b.toml", "tenant = \"a b\"\n")], &["valid tenant id"]),
        ("", &[("acme.toml", "tenant = [\n")], &["acme.toml"]),
        ("tenant = \"acme\"\n", &[], &["_defaults.toml", "names none"]),
        (
            "",
            &[("acme.toml", "tenant = \"acme\"\n[limits]\nmessages_per_second = 5\nmax_connections = 0\n")],
            &["acme.toml", "line 4", "limits.max_connections", "got 0"],
        ),
        ("[limits]\npublish_burst = -3\n", &[], &["_defaults.toml", "line 2", "limits.publish_burst", "got -3"]),
        ("[limits]\nmessage_burst = 5000000000\n", &[], &["limits.message_burst"]),
        (
            "",
            &[("acme.toml", "tenant = \"acme\"\nallowed_event_types = [\n  \"escalated\",\n  \"exploded\",\n]\n")],
            &["acme.toml", "line 4", "allowed_event_types", "exploded"],
        ),
        ("allowed_event_types = []\n", &[], &["at least one event type"]),
        ("allowed_origins = [\"app.example.com\"]\n", &[], &["allowed_origins", "not an origin"]),
        ("allowed_origins = [\"https://*.example.com\"]\n", &[], &["allowed_origins"]),
        ("allowed_origins = [\"https://a.example/path\"]\n", &[], &["allowed_origins"]),
        ("[mandatory_labels]\ntenant = \"org\"\n", &[], &["mandatory_labels.tenant", "line 2"]),
        ("revoked_subjects = [\"\"]\n", &[], &["revoked_subjects"]),
    ];
    for (d, list, needles) in cases {
        let all = errors(d, list).join("\n");
        for needle in *needles {
            assert!(all.contains(needle), "{needle:?} not in: {all}");
        }
    }
}

#[test]
fn every_error_of_every_file_is_reported() {
    let errs = errors(
        "[limits]\nmax_connections = 0\n",
        &[
            ("acme.toml", "tenant = \"acme\"\nallowed_event_types = [\"nope\"]\n[limits]\nmessage_burst = 0\n"),
            ("globex.toml", "tenant = \"globex\"\nwat = 1\n"),
            ("initech.toml", "tenant = \"initech\"\n"),
        ],
    );
    assert_eq!(errs.len(), 4, "{errs:#?}");
    assert!(errs[0].contains("_defaults.toml"));
    assert!(errs.iter().filter(|e| e.contains("acme.toml")).count() == 2);
    assert!(errs.iter().any(|e| e.contains("globex.toml") && e.contains("wat")));
}

#[test]
fn the_shipped_policies_are_valid() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
    let set = PolicySet::load_dir(&dir).expect("the repo's example policies validate");
    let tenants: Vec<_> = set.tenants().map(ToString::to_string).collect();
    assert_eq!(tenants, vec!["acme", "globex"]);
}
