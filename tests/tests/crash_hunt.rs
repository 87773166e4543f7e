//! The real `knsq-broker` SIGKILLed at random moments of a publish/deliver/finish cycle and
//! restarted on the same data directory, over and over: with `--sync-publish` no acknowledged
//! message may be lost, and what was finished before a crash comes back only within the
//! documented commit window.

use anyhow::{Result, ensure};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tests::BrokerProcess;
use tests::crash::{self, Ledger, Publishing, SharedLedger};

/// Starts a broker on `data` (port 0), keeping the directory across lives.
fn start(data: &tempfile::TempDir, extra: &[&str]) -> Result<BrokerProcess> {
    let mut args = vec![
        "--tcp-address=127.0.0.1:0".to_string(),
        "--http-address=127.0.0.1:0".to_string(),
        "--broadcast-address=127.0.0.1".to_string(),
        format!("--data-path={}", data.path().display()),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    BrokerProcess::spawn(&args)
}

/// One life of the broker: a producer and a consumer run until the broker is SIGKILLed after
/// `life`.
async fn live_and_die(
    data: &tempfile::TempDir,
    flags: &[&str],
    ledger: &SharedLedger,
    life: Duration,
) -> Result<()> {
    let broker = start(data, flags)?;
    let addr = broker.tcp_address;
    let producer = tokio::spawn(crash::produce(
        addr,
        ledger.clone(),
        Publishing {
            batch: 1,
            window: 64,
            limit: u64::MAX,
        },
    ));
    let consumer = tokio::spawn(crash::consume(
        addr,
        ledger.clone(),
        500,
        Duration::from_secs(30),
    ));
    tokio::time::sleep(life).await;
    broker.signal("KILL")?;
    let mut broker = broker;
    broker.wait_exit(Duration::from_secs(5))?;
    producer.await?;
    consumer.await?;
    Ok(())
}

/// After the last life: consume until everything acknowledged arrived and all is quiet.
async fn final_check(
    data: &tempfile::TempDir,
    flags: &[&str],
    ledger: &SharedLedger,
) -> Result<()> {
    let broker = start(data, flags)?;
    crash::consume(
        broker.tcp_address,
        ledger.clone(),
        500,
        Duration::from_secs(2),
    )
    .await;
    let l = ledger.lock().expect("ledger");
    let lost = l.lost();
    ensure!(
        lost.is_empty(),
        "{} acknowledged messages never delivered (of {} acknowledged), e.g. {:?}",
        lost.len(),
        l.acked.len(),
        &lost[..lost.len().min(20)]
    );
    Ok(())
}

/// The broker's flags for one life: `--sync-publish` and a segment size that varies, so that
/// kills land in small and large segments alike.
fn flags(rng: &mut fastrand::Rng) -> Vec<String> {
    let segment = [64 << 10, 1 << 20, 100 << 20][rng.usize(0..3)];
    vec![
        "--sync-publish".to_string(),
        format!("--max-bytes-per-file={segment}"),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_points_never_loses_an_acknowledged_message() -> Result<()> {
    // KNSQ_CRASH_ROUNDS=500 for a longer hunt.
    let rounds: usize = std::env::var("KNSQ_CRASH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(40);
    let data = tempfile::tempdir()?;
    let ledger: SharedLedger = Arc::new(Mutex::new(Ledger::default()));
    let mut rng = fastrand::Rng::new();
    for round in 1..=rounds {
        let flags = flags(&mut rng);
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        // Most lives are short; some run long enough to fill segments.
        let life = match rng.u8(0..10) {
            0 => Duration::from_millis(rng.u64(1000..3000)),
            _ => Duration::from_millis(rng.u64(5..400)),
        };
        live_and_die(&data, &flags, &ledger, life).await?;
        if round % 10 == 0 || round == rounds {
            // Everything acknowledged so far must come out now, not only after later lives
            // published more.
            final_check(&data, &flags, &ledger).await?;
        }
    }
    let l = ledger.lock().expect("ledger");
    eprintln!(
        "{rounds} kills: {} acknowledged, {} delivered, {} redeliveries ({} of finished messages, {} with attempts 1)",
        l.acked.len(),
        l.deliveries.len(),
        l.redeliveries(),
        l.redelivered_after_fin(),
        l.redeliveries_with_attempts_1(),
    );
    ensure!(
        l.redeliveries_with_attempts_1() == 0,
        "a redelivery after a crash carried attempts 1"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_crash_only_what_was_not_finished_comes_back() -> Result<()> {
    // 300k messages published while a consumer finishes them; the broker is SIGKILLed once
    // about 202k were delivered.
    let (total, kill_at, rdy) = (300_000u64, 202_000usize, 500u64);
    let flags = ["--sync-publish"];
    let data = tempfile::tempdir()?;
    let ledger: SharedLedger = Arc::new(Mutex::new(Ledger::default()));
    let broker = start(&data, &flags)?;
    let addr = broker.tcp_address;
    let producer = tokio::spawn(crash::produce(
        addr,
        ledger.clone(),
        Publishing {
            batch: 50,
            window: 16,
            limit: total,
        },
    ));
    let consumer = tokio::spawn(crash::consume(
        addr,
        ledger.clone(),
        rdy,
        Duration::from_secs(30),
    ));
    let deadline = std::time::Instant::now() + Duration::from_secs(300);
    while ledger.lock().expect("ledger").deliveries.len() < kill_at {
        ensure!(
            std::time::Instant::now() < deadline,
            "{} delivered after 300 s",
            ledger.lock().expect("ledger").deliveries.len()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    broker.signal("KILL")?;
    let mut broker = broker;
    broker.wait_exit(Duration::from_secs(5))?;
    producer.await?;
    consumer.await?;
    let (delivered_before, fin_sent_before) = {
        let l = ledger.lock().expect("ledger");
        (l.deliveries.len(), l.fin_sent.len())
    };
    final_check(&data, &flags, &ledger).await?;
    let l = ledger.lock().expect("ledger");
    let redelivered: Vec<u16> = l
        .deliveries
        .values()
        .filter(|d| d.len() > 1)
        .map(|d| d[1])
        .collect();
    eprintln!(
        "{total} published, SIGKILL after {delivered_before} delivered ({fin_sent_before} FINs sent): {} redelivered after the restart, attempts {:?}..{:?}",
        redelivered.len(),
        redelivered.iter().min(),
        redelivered.iter().max(),
    );
    // What may come back: the messages in flight (RDY), plus FINs on the wire or finished
    // since the channel last read from disk (one delivery batch).
    ensure!(
        redelivered.len() as u64 <= rdy + 2 * 64,
        "{} redelivered; at most the {rdy} in flight and a delivery batch may come back",
        redelivered.len()
    );
    ensure!(
        redelivered.iter().all(|&attempts| attempts >= 2),
        "a redelivered message carried attempts 1"
    );
    Ok(())
}
