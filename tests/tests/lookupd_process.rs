//! The real `knsq-lookupd` binary: port 0 and its log lines, nsqlookupd command lines,
//! environment variables, bad flags, and SIGTERM.

use anyhow::Result;
use std::process::{Command as Process, Stdio};
use std::time::Duration;
use tests::lookupd::{LookupdProcess, RegistrationStream, identify, register_topic};
use tests::{binary_path, http_request};
use tonic::Code;

#[tokio::test(flavor = "multi_thread")]
async fn serves_on_port_zero_and_stops_cleanly_on_sigterm() -> Result<()> {
    let mut lookupd = LookupdProcess::start(&[])?;
    assert_ne!(lookupd.grpc_address.port(), 0);
    assert_ne!(lookupd.http_address.port(), 0);
    let ping = http_request(lookupd.http_address, "GET", "/ping", b"").await?;
    assert_eq!((ping.status, ping.text().as_str()), (200, "OK"));
    let info = http_request(lookupd.http_address, "GET", "/info", b"").await?;
    assert_eq!(info.json()?, serde_json::json!({ "version": "1.3.0" }));
    assert_eq!(info.header("x-nsq-content-type"), Some("nsq; version=1.0"));

    let (mut broker, identified) =
        RegistrationStream::identified(lookupd.grpc_address, identify(4150, 4151)).await?;
    assert_eq!(identified.http_port, u32::from(lookupd.http_address.port()));
    broker.acked(register_topic("t")).await?;
    let found = http_request(lookupd.http_address, "GET", "/lookup?topic=t", b"").await?;
    assert_eq!(found.json()?["producers"][0]["tcp_port"], 4150);
    lookupd.wait_for_log("broker registered")?;

    lookupd.signal("TERM")?;
    let status = broker.expect_status().await?;
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    let exit = lookupd.wait_exit(Duration::from_secs(5))?;
    assert!(exit.success(), "exit status {exit}");
    lookupd.wait_for_log("knsq-lookupd stopped")?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn accepts_an_nsqlookupd_command_line_and_environment_variables() -> Result<()> {
    // nsqlookupd's own flags, Go syntax: --tcp-address is the gRPC address here.
    let args: Vec<String> = [
        "-tcp-address=127.0.0.1:0",
        "-http-address",
        "127.0.0.1:0",
        "-broadcast-address=lookupd-0",
        "-inactive-producer-timeout=1m",
        "-tombstone-lifetime=10s",
        "-log-level=debug",
        "-verbose",
    ]
    .map(String::from)
    .to_vec();
    let lookupd = LookupdProcess::spawn(&args, &[])?;
    let (_, identified) =
        RegistrationStream::identified(lookupd.grpc_address, identify(4150, 4151)).await?;
    assert_eq!(identified.broadcast_address, "lookupd-0");
    drop(lookupd);

    let env = [
        ("KNSQ_LOOKUPD_GRPC_ADDRESS", "127.0.0.1:0"),
        ("KNSQ_LOOKUPD_HTTP_ADDRESS", "127.0.0.1:0"),
        ("KNSQ_LOOKUPD_BROADCAST_ADDRESS", "from-env"),
    ];
    let lookupd = LookupdProcess::spawn(&[], &env)?;
    let (_, identified) =
        RegistrationStream::identified(lookupd.grpc_address, identify(4150, 4151)).await?;
    assert_eq!(identified.broadcast_address, "from-env");
    Ok(())
}

#[test]
fn a_bad_flag_value_is_a_startup_error_naming_the_flag() -> Result<()> {
    for (args, flag) in [
        (vec!["--tombstone-lifetime=soon"], "--tombstone-lifetime"),
        (
            vec!["-inactive-producer-timeout=0"],
            "--inactive-producer-timeout",
        ),
        (vec!["--http-address=256.0.0.1:1"], "--http-address"),
    ] {
        let out = Process::new(binary_path("knsq-lookupd"))
            .args(["--grpc-address=127.0.0.1:0", "--broadcast-address=x"])
            .args(&args)
            .stdin(Stdio::null())
            .output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} started");
        assert!(stderr.contains(flag), "{args:?}: {stderr}");
    }
    Ok(())
}
