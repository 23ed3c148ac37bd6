//! The web dashboard in a real browser: headless Chromium (over the DevTools protocol) opens the
//! hub's page while a real network (hub and two node processes, the real model) serves jobs.

mod support {
    pub mod browser;
    pub mod network;
}

use std::time::Duration;

use anyhow::{Context, Result};
use support::browser::Browser;
use support::network::start_hub;
use tessera_agent::{ChatMessage, ChatRequest, Client};
use tessera_protocol::Wallet;

fn question(text: &str) -> ChatRequest {
    ChatRequest {
        model: "smollm2-135m".into(),
        messages: vec![ChatMessage::new("user", text)],
        max_tokens: Some(12),
        temperature: Some(0.0),
        user: Some("synth:dashboard-test".into()),
        ..Default::default()
    }
}

fn row_present(table: &str, attribute: &str, value: &str) -> String {
    format!("document.querySelector('#{table} tbody tr[data-{attribute}=\"{value}\"]') !== null")
}

#[test]
fn the_dashboard_shows_providers_and_jobs_live_and_draws_its_charts() -> Result<()> {
    let hub = start_hub(&["--verify-probability", "1"])?;
    let (a, b) = (Wallet::random(), Wallet::random());
    let _a = hub.node("node-a", &a, 10, &["--dev-stake"])?;
    let _b = hub.node("node-b", &b, 12, &["--dev-stake"])?;
    hub.wait_connected(2)?;
    let agent = Wallet::random();
    hub.fund(&agent, 1_000_000)?;
    let client = Client::new(&hub.url, &agent)?;
    let first = client.chat(&question("Name a colour."))?;

    let mut page = Browser::launch()?;
    page.navigate(&hub.url)?;
    let wait = Duration::from_secs(60);
    for w in [&a, &b] {
        let address = format!("{:#x}", w.address());
        page.wait_for(
            "both providers listed",
            &row_present("providers", "address", &address),
            wait,
        )?;
    }
    page.wait_for(
        "the first job listed",
        &row_present("jobs", "id", &first.receipt.job_id),
        wait,
    )?;
    // A marker a reload would wipe: the next job must appear while it stays.
    page.eval("window.tesseraMarker = 42; true")?;
    let second = client.chat(&question("Name a fruit."))?;
    page.wait_for(
        "the new job to appear without a reload",
        &row_present("jobs", "id", &second.receipt.job_id),
        wait,
    )?;
    assert_eq!(
        page.eval("window.tesseraMarker")?,
        serde_json::json!(42),
        "the page was not reloaded"
    );
    // Every job is checked here; the verdict replaces `pending` in the row, live.
    page.wait_for(
        "the second job's verification to pass",
        &format!(
            "Array.from(document.querySelectorAll('#jobs tbody tr[data-id=\"{}\"] td')).some(td => td.textContent === 'passed')",
            second.receipt.job_id
        ),
        Duration::from_secs(90),
    )?;
    page.wait_for(
        "the labelled run to be summed",
        "document.querySelector('#runs tbody').textContent.includes('synth:dashboard-test')",
        wait,
    )?;
    // The throughput chart has drawn its line: pixels of its colour (#3b5bdb) on the canvas.
    page.wait_for(
        "the throughput chart to draw",
        "(() => { const c = document.getElementById('chart-throughput'); \
           if (Number(c.dataset.points || 0) < 2) return false; \
           const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; \
           for (let i = 0; i < d.length; i += 4) { \
             if (Math.abs(d[i] - 59) < 40 && Math.abs(d[i + 1] - 91) < 40 && Math.abs(d[i + 2] - 219) < 40) return true; } \
           return false; })()",
        wait,
    )?;
    let png = page.screenshot()?;
    assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
    let artifact = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    std::fs::write(&artifact, &png).context("saving the screenshot")?;
    eprintln!("screenshot: {} ({} bytes)", artifact.display(), png.len());
    hub.audit()
}
