use super::*;

fn at(secs: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
}

fn peer(address: &str, tcp_port: u16) -> PeerInfo {
    PeerInfo {
        remote_address: format!("10.0.0.1:{}", 40000 + tcp_port),
        hostname: format!("{address}-host"),
        broadcast_address: address.into(),
        tcp_port,
        http_port: tcp_port + 1,
        version: "0.1.0".into(),
        node_id: 1,
        topology_zone: String::new(),
        topology_region: String::new(),
        handoff_port: 0,
    }
}

fn registry() -> Registry {
    Registry::new(Lifetimes::default())
}

fn producer_ports(registry: &Registry, topic: &str, now: SystemTime) -> Vec<u16> {
    registry
        .lookup(topic, now)
        .map(|l| l.producers.iter().map(|p| p.tcp_port).collect())
        .unwrap_or_default()
}

fn topics_of(snapshot: &[(&str, &[&str])]) -> Vec<(String, Vec<String>)> {
    snapshot
        .iter()
        .map(|(t, cs)| (t.to_string(), cs.iter().map(|c| c.to_string()).collect()))
        .collect()
}

#[test]
fn register_makes_topics_and_channels_visible() {
    let mut r = registry();
    assert_eq!(r.identify(1, peer("b1", 4150), at(0)), None);
    r.register_topic(1, "t", at(0)).unwrap();
    r.register_channel(1, "t", "c", at(0)).unwrap();
    r.register_channel(1, "u", "d", at(0)).unwrap();
    let lookup = r.lookup("t", at(1)).unwrap();
    assert_eq!(lookup.channels, ["c"]);
    assert_eq!(lookup.producers, [&peer("b1", 4150)]);
    assert_eq!(r.topics(), ["t", "u"], "a channel registers its topic");
    assert_eq!(r.channels("u"), ["d"]);
    assert!(r.lookup("nope", at(1)).is_none());
    assert_eq!(
        r.counts(),
        Counts {
            brokers: 1,
            topics: 2,
            channels: 2
        }
    );
}

#[test]
fn operations_need_an_identified_session() {
    let mut r = registry();
    assert_eq!(
        r.register_topic(7, "t", at(0)),
        Err(RegistryError::UnknownSession(7))
    );
    assert_eq!(r.heartbeat(7, at(0)), Err(RegistryError::UnknownSession(7)));
    assert!(r.topics().is_empty());
}

#[test]
fn unregister_keeps_non_ephemeral_keys() {
    let mut r = registry();
    r.identify(1, peer("b1", 4150), at(0));
    r.identify(2, peer("b2", 4150), at(0));
    r.register_channel(1, "t", "c", at(0)).unwrap();
    r.register_channel(2, "t", "c", at(0)).unwrap();
    r.unregister_channel(1, "t", "c", at(1)).unwrap();
    assert_eq!(r.channels("t"), ["c"]);
    assert_eq!(producer_ports(&r, "t", at(1)), [4150, 4150]);
    // Unregistering a topic drops that broker's channels of it too.
    r.unregister_topic(2, "t", at(2)).unwrap();
    let lookup = r.lookup("t", at(2)).unwrap();
    assert_eq!(lookup.producers.len(), 1);
    assert_eq!(lookup.producers[0].broadcast_address, "b1");
    r.unregister_topic(1, "t", at(3)).unwrap();
    let lookup = r.lookup("t", at(3)).unwrap();
    assert!(
        lookup.producers.is_empty(),
        "the key stays, without producers"
    );
    assert_eq!(lookup.channels, ["c"]);
    // Unregistering what was never registered is harmless.
    r.unregister_channel(1, "x", "y", at(4)).unwrap();
    r.unregister_topic(1, "x", at(4)).unwrap();
    assert_eq!(r.topics(), ["t"]);
}

#[test]
fn ephemeral_registrations_go_with_their_last_producer() {
    let mut r = registry();
    r.identify(1, peer("b1", 4150), at(0));
    r.identify(2, peer("b2", 4150), at(0));
    r.register_channel(1, "t", "c#ephemeral", at(0)).unwrap();
    r.register_channel(2, "t", "c#ephemeral", at(0)).unwrap();
    r.register_channel(1, "e#ephemeral", "c", at(0)).unwrap();
    r.register_channel(2, "e#ephemeral", "c", at(0)).unwrap();
    r.unregister_channel(1, "t", "c#ephemeral", at(1)).unwrap();
    assert_eq!(r.channels("t"), ["c#ephemeral"], "b2 still has it");
    r.unregister_channel(2, "t", "c#ephemeral", at(1)).unwrap();
    assert!(r.channels("t").is_empty());
    assert_eq!(r.topics(), ["e#ephemeral", "t"], "t is not ephemeral");

    r.unregister_topic(1, "e#ephemeral", at(2)).unwrap();
    assert_eq!(r.topics(), ["e#ephemeral", "t"]);
    // The last producer's stream ends: the ephemeral topic goes with it.
    assert_eq!(r.remove_session(2).map(|p| p.tcp_port), Some(4150));
    assert_eq!(r.topics(), ["t"]);
}

#[test]
fn ending_a_session_removes_everything_of_that_broker_at_once() {
    let mut r = registry();
    r.identify(1, peer("b1", 4150), at(0));
    r.identify(2, peer("b2", 4150), at(0));
    r.register_channel(1, "t", "c", at(0)).unwrap();
    r.register_channel(2, "t", "c", at(0)).unwrap();
    r.register_topic(1, "only1", at(0)).unwrap();
    assert!(r.remove_session(1).is_some());
    assert_eq!(
        r.nodes(at(1))
            .iter()
            .map(|n| n.info.broadcast_address.as_str())
            .collect::<Vec<_>>(),
        ["b2"]
    );
    assert!(r.lookup("only1", at(1)).unwrap().producers.is_empty());
    assert_eq!(r.lookup("t", at(1)).unwrap().producers, [&peer("b2", 4150)]);
    assert!(
        r.debug()
            .iter()
            .all(|e| e.producers.iter().all(|p| p.id.broadcast_address == "b2"))
    );
    assert_eq!(r.remove_session(1), None, "already gone");
    assert_eq!(
        r.register_topic(1, "t", at(2)),
        Err(RegistryError::UnknownSession(1))
    );
}

#[test]
fn a_new_session_of_the_same_broker_takes_over() {
    let mut r = registry();
    r.identify(1, peer("b1", 4150), at(0));
    r.register_channel(1, "t", "c", at(0)).unwrap();
    assert_eq!(r.identify(2, peer("b1", 4150), at(1)), Some(1));
    assert_eq!(
        r.lookup("t", at(1)).unwrap().producers.len(),
        1,
        "listed once"
    );
    // The old session can neither change nor remove the broker any more.
    assert_eq!(
        r.register_topic(1, "x", at(2)),
        Err(RegistryError::UnknownSession(1))
    );
    assert_eq!(r.remove_session(1), None);
    assert_eq!(r.lookup("t", at(2)).unwrap().producers.len(), 1);
    assert_eq!(r.session_broker(2).map(|p| p.tcp_port), Some(4150));
    // Another port on the same address is another broker.
    assert_eq!(r.identify(3, peer("b1", 5150), at(2)), None);
    assert_eq!(r.counts().brokers, 2);
}

#[test]
fn snapshot_replaces_the_brokers_registrations() {
    let mut r = registry();
    r.identify(1, peer("b1", 4150), at(0));
    r.identify(2, peer("b2", 4150), at(0));
    r.register_channel(2, "keep", "other", at(0)).unwrap();
    r.snapshot(
        1,
        &topics_of(&[("keep", &["a", "b"]), ("gone", &["x"])]),
        at(0),
    )
    .unwrap();
    r.tombstone("keep", "b1:4151", at(0));
    r.snapshot(
        1,
        &topics_of(&[("keep", &["b", "new"]), ("fresh", &[])]),
        at(1),
    )
    .unwrap();
    let nodes = r.nodes(at(1));
    assert_eq!(
        nodes[0].topics,
        [("fresh", false), ("keep", true)],
        "the tombstone of a kept topic stays"
    );
    assert_eq!(
        r.debug()
            .iter()
            .filter(|e| e.producers.iter().any(|p| p.id.broadcast_address == "b1"))
            .map(|e| e.key.as_str())
            .collect::<Vec<_>>(),
        [
            "client::",
            "topic:fresh:",
            "topic:keep:",
            "channel:keep:b",
            "channel:keep:new"
        ]
    );
    // Keys stay (nsqlookupd never drops a non-ephemeral key on its own).
    assert_eq!(r.channels("keep"), ["a", "b", "new", "other"]);
    assert!(r.lookup("gone", at(1)).unwrap().producers.is_empty());
    assert_eq!(r.lookup("keep", at(1)).unwrap().producers.len(), 1);
    assert_eq!(r.lookup("keep", at(45)).unwrap().producers.len(), 2);
}

#[test]
fn silent_brokers_are_hidden_after_the_inactivity_timeout() {
    let mut r = Registry::new(Lifetimes {
        inactive_producer_timeout: Duration::from_secs(10),
        tombstone_lifetime: Duration::from_secs(45),
    });
    r.identify(1, peer("b1", 4150), at(0));
    r.identify(2, peer("b2", 4150), at(0));
    r.register_topic(1, "t", at(0)).unwrap();
    r.register_topic(2, "t", at(0)).unwrap();
    r.heartbeat(2, at(8)).unwrap();
    assert_eq!(r.lookup("t", at(10)).unwrap().producers.len(), 2);
    assert_eq!(r.nodes(at(10)).len(), 2);
    assert_eq!(
        r.lookup("t", at(11)).unwrap().producers,
        [&peer("b2", 4150)],
        "b1 silent for 11s"
    );
    assert_eq!(r.nodes(at(11)).len(), 1);
    assert_eq!(r.counts().brokers, 2, "hidden, not removed");
    // Speaking again brings it back.
    r.heartbeat(1, at(12)).unwrap();
    assert_eq!(r.lookup("t", at(12)).unwrap().producers.len(), 2);
    // Any message is a sign of life, not only heartbeats.
    r.register_topic(2, "u", at(21)).unwrap();
    assert_eq!(r.nodes(at(21)).len(), 2);
    assert_eq!(r.nodes(at(23)).len(), 1);
}

#[test]
fn tombstones_hide_a_producer_of_a_topic_for_their_lifetime() {
    let mut r = registry();
    r.identify(1, peer("b1", 4150), at(0));
    r.identify(2, peer("b2", 4150), at(0));
    for session in [1, 2] {
        r.register_topic(session, "t", at(0)).unwrap();
        r.register_topic(session, "u", at(0)).unwrap();
    }
    assert_eq!(r.tombstone("t", "b1:4151", at(100)), 1);
    assert_eq!(
        r.tombstone("t", "b1:4150", at(100)),
        0,
        "the HTTP port names it"
    );
    assert_eq!(r.tombstone("nope", "b1:4151", at(100)), 0);
    for session in [1, 2] {
        r.heartbeat(session, at(144)).unwrap();
    }
    assert_eq!(
        r.lookup("t", at(144)).unwrap().producers,
        [&peer("b2", 4150)]
    );
    assert_eq!(
        r.lookup("u", at(144)).unwrap().producers.len(),
        2,
        "other topics unaffected"
    );
    let nodes = r.nodes(at(144));
    assert_eq!(nodes.len(), 2, "/nodes still lists tombstoned brokers");
    assert_eq!(nodes[0].topics, [("t", true), ("u", false)]);
    // 45s later the tombstone has expired.
    assert_eq!(r.lookup("t", at(145)).unwrap().producers.len(), 2);
    assert_eq!(r.nodes(at(145))[0].topics, [("t", false), ("u", false)]);
    // /debug still shows when it was set, as nsqlookupd's does.
    let debug = r.debug();
    let topic_t = debug.iter().find(|e| e.key == "topic:t:").unwrap();
    assert_eq!(topic_t.producers[0].tombstoned_at, Some(at(100)));
}

#[test]
fn tombstone_ends_when_the_broker_unregisters_the_topic() {
    let mut r = registry();
    r.identify(1, peer("b1", 4150), at(0));
    r.register_topic(1, "t", at(0)).unwrap();
    r.tombstone("t", "b1:4151", at(1));
    assert!(r.lookup("t", at(2)).unwrap().producers.is_empty());
    r.unregister_topic(1, "t", at(3)).unwrap();
    r.register_topic(1, "t", at(4)).unwrap();
    assert_eq!(r.lookup("t", at(4)).unwrap().producers.len(), 1);
}

#[test]
fn http_administration_of_keys() {
    let mut r = registry();
    r.identify(1, peer("b1", 4150), at(0));
    r.create_topic("t");
    assert_eq!(r.topics(), ["t"]);
    assert!(r.lookup("t", at(0)).unwrap().producers.is_empty());
    r.create_channel("u", "c");
    assert_eq!(
        r.topics(),
        ["t", "u"],
        "creating a channel creates its topic"
    );
    assert!(r.delete_channel("u", "c"));
    assert!(!r.delete_channel("u", "c"));
    assert!(!r.delete_channel("nope", "c"));
    r.register_channel(1, "t", "c", at(0)).unwrap();
    r.delete_topic("t");
    assert!(r.lookup("t", at(0)).is_none());
    assert!(r.channels("t").is_empty());
    assert_eq!(
        r.nodes(at(0))[0].topics,
        [],
        "the broker no longer produces it"
    );
    assert_eq!(r.counts().brokers, 1);
}
