use super::*;
use crate::settings::Settings;

/// webhook-queue's documented sample configuration, comments removed (JSON has none).
const WEBHOOK_QUEUE_SAMPLE: &str = r#"{
    "listen_host": "0.0.0.0",
    "listen_port": 8080,
    "users": [
        {
            "name": "John Doe",
            "pass_hash": "plain;;insecure",
            "can_reload": false,
            "queues": [
                "foo"
            ]
        }
    ],
    "queues": [
        {
            "name": "foo",
            "whitelist_ip": ["127.0.0.1"],
            "auth": {
                "method": "hmac-sha256",
                "key": "12345",
                "header_name": "Foo-Auth"
            }
        }
    ],
    "max_message_count": 100,
    "max_message_size": 10000,
    "max_queue_size": 500000
}"#;

fn no_env() -> Vec<(String, String)> {
    Vec::new()
}

fn compile(path: &str, text: &str, env: Vec<(String, String)>) -> Result<Settings, Error> {
    let (cfg, src) = parse(Some(Path::new(path)), text, env)?;
    Settings::compile(cfg, src)
}

fn key_errors(e: Error) -> Vec<String> {
    match e {
        Error::Invalid(v) => v.into_iter().map(|k| k.to_string()).collect(),
        other => panic!("expected key errors, got {other}"),
    }
}

#[test]
fn webhook_queue_sample_loads_unchanged() {
    let s = compile("options.conf", WEBHOOK_QUEUE_SAMPLE, no_env()).unwrap();
    assert!(s.source.legacy);
    assert_eq!(s.source.format, Format::Json);
    assert_eq!(s.listen.to_string(), "0.0.0.0:8080");
    let q = s.queue("foo").unwrap();
    assert_eq!(q.limits.max_message_size, 10000);
    assert_eq!(q.limits.max_queue_size, 500000);
    assert_eq!(q.auth.method(), "hmac-sha256");
    assert_eq!(q.allow_ips.len(), 1);
    let u = &s.users["John Doe"];
    assert!(u.may_read("foo") && !u.may_read("bar"));
    assert!(u.password.verify("insecure"));
    assert_eq!(s.weak_password_users(), vec!["John Doe"]);
}

#[test]
fn webhook_queue_nulls_and_per_queue_overrides() {
    let text = r#"{"listen_host":"127.0.0.1","listen_port":9000,
        "users":[{"name":"a","pass_hash":"plain;;pw","queues":null}],
        "queues":[{"name":"q","whitelist_ip":null,"auth":null,"max_message_count":5}]}"#;
    let s = compile("options.conf", text, no_env()).unwrap();
    let q = s.queue("q").unwrap();
    assert_eq!(q.limits.max_message_count, 5);
    assert_eq!(q.limits.max_message_size, 20000, "webhook-queue's default");
    assert_eq!(q.auth.method(), "none");
    assert!(s.users["a"].grants.is_empty());
}

#[test]
fn example_is_valid() {
    let (cfg, src) = parse(None, EXAMPLE, no_env()).unwrap();
    let s = Settings::compile(cfg, src).unwrap();
    assert!(s.queue("demo").is_some());
    assert!(s.queue("chat.room1").is_some());
    assert!(s.queue("chat.").is_none() && s.queue("other").is_none());
    assert!(s.users["demo"].password.verify("demo-password"));
}

#[test]
fn env_overrides_apply_to_both_shapes() {
    let env = vec![
        (
            "BROKER__SERVER__LISTEN".to_owned(),
            "127.0.0.1:9999".to_owned(),
        ),
        (
            "BROKER__LIMITS__MAX_MESSAGE_COUNT".to_owned(),
            "7".to_owned(),
        ),
        ("UNRELATED".to_owned(), "x".to_owned()),
    ];
    let s = compile("options.conf", WEBHOOK_QUEUE_SAMPLE, env.clone()).unwrap();
    assert_eq!(s.listen.port(), 9999);
    let s = compile("b.toml", "[server]\nlisten = \"127.0.0.1:1\"\n", env).unwrap();
    assert_eq!(s.listen.port(), 9999);
    assert_eq!(s.config.limits.max_message_count, 7);
}

#[test]
fn unknown_keys_are_named() {
    let e = compile(
        "b.toml",
        "[server]\nlisten = \"127.0.0.1:1\"\nlisen = 3\n",
        no_env(),
    )
    .unwrap_err();
    let errs = key_errors(e);
    assert!(errs[0].contains("lisen"), "{errs:?}");
    assert!(errs[0].starts_with("server"), "{errs:?}");

    let mut legacy: serde_json::Value = serde_json::from_str(WEBHOOK_QUEUE_SAMPLE).unwrap();
    legacy["queues"][0]["whitelist"] = serde_json::json!([]);
    let e = compile("options.conf", &legacy.to_string(), no_env()).unwrap_err();
    let errs = key_errors(e);
    assert!(
        errs[0].starts_with("queues[0]") && errs[0].contains("whitelist"),
        "{errs:?}"
    );
}

#[test]
fn bad_values_are_named() {
    let e = compile(
        "b.toml",
        "[limits]\nmax_message_count = \"many\"\n",
        no_env(),
    )
    .unwrap_err();
    let errs = key_errors(e);
    assert!(errs[0].starts_with("limits.max_message_count"), "{errs:?}");

    let text = r#"
[server]
listen = "nowhere"
trusted_proxies = ["10.0.0.0/8", "bogus"]
[[queues]]
name = "a b"
[[queues]]
name = "ok"
allow_ips = ["300.1.1.1"]
auth = { method = "hmac-sha256", key = "k" }
max_message_size = 5000000
[[users]]
name = "u"
pass_hash = "md5;;x"
"#;
    let errs = key_errors(compile("b.toml", text, no_env()).unwrap_err());
    let keys: Vec<&str> = errs.iter().map(|e| e.split(':').next().unwrap()).collect();
    for want in [
        "server.listen",
        "server.trusted_proxies[1]",
        "queues[0].name",
        "queues[1].max_message_size",
        "queues[1].allow_ips[0]",
        "queues[1].auth.header_name",
        "users[0].pass_hash",
    ] {
        assert!(keys.contains(&want), "missing {want} in {errs:?}");
    }
}

#[test]
fn yaml_and_json_native_files() {
    let yaml = "server:\n  listen: 127.0.0.1:7000\nqueues:\n  - name: y\n";
    let s = compile("b.yaml", yaml, no_env()).unwrap();
    assert!(s.queue("y").is_some());
    let json = r#"{"server":{"listen":"127.0.0.1:7001"},"queues":[{"name":"j"}]}"#;
    let s = compile("b.json", json, no_env()).unwrap();
    assert!(!s.source.legacy && s.queue("j").is_some());
}

#[test]
fn storage_urls() {
    for ok in [
        "memory://",
        "sqlite://./data/broker.db",
        "postgres://u@h/db",
        "postgresql://h/db",
        "nats://127.0.0.1:4222",
        "nats://a:4222,nats://b:4222",
    ] {
        compile("b.toml", &format!("[storage]\nurl = \"{ok}\"\n"), no_env()).unwrap();
    }
    let errs =
        key_errors(compile("b.toml", "[storage]\nurl = \"redis://x\"\n", no_env()).unwrap_err());
    assert!(errs[0].starts_with("storage.url"), "{errs:?}");
}

#[test]
fn nats_section_is_validated() {
    let ok =
        "[storage]\nurl = \"nats://h:4222\"\n[storage.nats]\nprefix = \"team-a\"\nreplicas = 3\n";
    let s = compile("b.toml", ok, no_env()).unwrap();
    assert_eq!(
        (
            s.config.storage.nats.prefix.as_str(),
            s.config.storage.nats.replicas
        ),
        ("team-a", 3)
    );
    for (bad, key) in [
        ("prefix = \"a.b\"", "storage.nats.prefix"),
        ("prefix = \"\"", "storage.nats.prefix"),
        ("replicas = 7", "storage.nats.replicas"),
    ] {
        let text = format!("[storage]\nurl = \"nats://h:4222\"\n[storage.nats]\n{bad}\n");
        let errs = key_errors(compile("b.toml", &text, no_env()).unwrap_err());
        assert!(errs.iter().any(|e| e.starts_with(key)), "{bad}: {errs:?}");
    }
    // A password in the URL never reaches an error message.
    let errs = key_errors(
        compile(
            "b.toml",
            "[storage]\nurl = \"redis://u:s3cret@h\"\n",
            no_env(),
        )
        .unwrap_err(),
    );
    assert!(!errs.iter().any(|e| e.contains("s3cret")), "{errs:?}");
}

#[test]
fn pusher_section_is_validated() {
    let s = compile(
        "b.toml",
        "[pusher]\nkey = \"k\"\nsecret = \"s\"\n",
        no_env(),
    )
    .unwrap();
    let p = s.pusher.as_ref().unwrap();
    assert_eq!((p.config.path.as_str(), s.realm()), ("/push", "realm1"));
    assert_eq!(p.signing.as_ref().unwrap().0, "k");
    assert_eq!(format!("{:?}", p.signing), "Some((\"k\", ***))");
    for (toml, key) in [
        ("[pusher]\nkey = \"k\"\n", "pusher.secret"),
        ("[pusher]\nsecret = \"s\"\n", "pusher.key"),
        (
            "[pusher]\nkey = \"k\"\nsecret = \"s\"\ntimestamp_delta_limit = 0\n",
            "pusher.timestamp_delta_limit",
        ),
        ("[pusher]\npath = \"/v1/push\"\n", "pusher.path"),
        ("[pusher]\npath = \"push\"\n", "pusher.path"),
        (
            "[pusher]\nrequire_ip = [\"nope\"]\n",
            "pusher.require_ip[0]",
        ),
    ] {
        let errs = key_errors(compile("b.toml", toml, no_env()).unwrap_err());
        assert!(errs.iter().any(|e| e.starts_with(key)), "{toml}: {errs:?}");
    }
    let s = compile("b.toml", "", no_env()).unwrap();
    assert!(s.pusher.is_none());
}

mod props {
    use super::*;
    use proptest::prelude::*;

    /// A value for a key: what a careless or hostile config may hold.
    fn value() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<i64>().prop_map(|n| n.to_string()),
            any::<u64>().prop_map(|n| n.to_string()),
            "-?[0-9]{1,30}".prop_map(|s| s),
            "\"[^\"\\\\]{0,24}\"".prop_map(|s| s),
            "\"-?[0-9]{1,22}(ms|s|m|h|days|y)?\"".prop_map(|s| s),
            Just("true".to_owned()),
            Just("[]".to_owned()),
            Just("[\"::/0\", \"x\"]".to_owned()),
            Just("{}".to_owned()),
        ]
    }

    const KEYS: &[&str] = &[
        "server.listen",
        "server.max_body_size",
        "server.trusted_proxies",
        "limits.max_message_count",
        "limits.max_message_size",
        "limits.max_queue_size",
        "limits.max_delay",
        "limits.max_delayed_bytes",
        "limits.idle_queue_timeout",
        "limits.login_attempts_per_minute",
        "ws.ping_interval",
        "ws.max_frame_size",
        "ws.auth_timeout",
        "webhooks.allow_targets",
        "storage.url",
    ];

    proptest! {
        /// Any text as a config file, in either format: loaded and compiled, or a
        /// typed error — never a panic.
        #[test]
        fn any_text_loads_or_is_refused(text in ".{0,200}", json in any::<bool>()) {
            let path = if json { "b.json" } else { "b.toml" };
            let _ = compile(path, &text, no_env());
        }

        /// Any value for the keys that take numbers, durations, addresses and lists:
        /// compiled or refused with the key named, never a panic.
        #[test]
        fn any_value_of_a_known_key_is_compiled_or_refused(
            picks in proptest::collection::vec((0..KEYS.len(), value()), 1..4),
        ) {
            let mut text = String::new();
            for (k, v) in picks {
                let (section, key) = KEYS[k].split_once('.').unwrap();
                text.push_str(&format!("[{section}]\n{key} = {v}\n"));
            }
            let _ = compile("b.toml", &text, no_env());
        }

        /// The same through environment overrides (`BROKER__SECTION__KEY`).
        #[test]
        fn any_environment_override_is_compiled_or_refused(
            k in 0..KEYS.len(),
            v in ".{0,30}",
        ) {
            let (section, key) = KEYS[k].split_once('.').unwrap();
            let name = format!("BROKER__{}__{}", section.to_uppercase(), key.to_uppercase());
            let _ = compile("b.toml", "", vec![(name, v)]);
        }
    }
}
