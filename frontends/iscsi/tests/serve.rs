//! The target over real TCP on 127.0.0.1: several sessions at once, and a
//! shutdown that lets accepted commands finish and then closes everything.

use std::sync::Arc;
use std::time::Duration;

use jiva_core::mem::MemDevice;
use jiva_iscsi::IscsiTarget;
use jiva_iscsi::client::{Client, LoginOptions};
use jiva_scsi::Command;
use jiva_scsi::cdb::{Rw, Width};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

const IQN: &str = "iqn.2026-11.io.jiva:serve";

fn rw(lba: u64, blocks: u32) -> Rw {
    Rw { width: Width::W10, lba, blocks, dpo: false, fua: false, protect: 0 }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_over_tcp_and_clean_shutdown() {
    let dev = Arc::new(MemDevice::new(16 << 20));
    let target = Arc::new(IscsiTarget::new(Arc::clone(&dev), IQN));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(Arc::clone(&target).serve(listener, async {
        let _ = stopped.await;
    }));

    // Discovery advertises the address we connected to.
    let mut d = Client::login(TcpStream::connect(addr).await.unwrap(), LoginOptions::discovery("iqn.i"))
        .await
        .unwrap();
    let targets = d.text(&[("SendTargets", "All")]).await.unwrap();
    assert!(targets.contains(&("TargetAddress".into(), format!("{addr},1"))), "{targets:?}");
    d.logout().await.unwrap();

    // Four sessions writing and reading their own regions concurrently.
    let mut jobs = Vec::new();
    for k in 0..4u8 {
        jobs.push(tokio::spawn(async move {
            let mut o = LoginOptions::normal(&format!("iqn.2026-11.io.jiva:init-{k}"), IQN);
            o.isid[5] = k;
            let mut c = Client::login(TcpStream::connect(addr).await.unwrap(), o).await.unwrap();
            let data = vec![k + 1; 64 * 1024];
            for round in 0..20u64 {
                let lba = u64::from(k) * 4096 + round * 128;
                let w = c.command(&Command::Write(rw(lba, 128)).encode(), Some(&data), 0).await.unwrap();
                assert_eq!(w.status, 0);
                let r = c.command(&Command::Read(rw(lba, 128)).encode(), None, 65536).await.unwrap();
                assert!(r.data == data);
            }
            c
        }));
    }
    let mut clients = Vec::new();
    for j in jobs {
        clients.push(j.await.unwrap());
    }
    assert_eq!(target.session_count(), 4);

    // Shutdown closes the sessions and serve returns.
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(20), server)
        .await
        .expect("serve did not return")
        .unwrap()
        .unwrap();
    for mut c in clients {
        assert!(c.recv().await.is_err(), "connection still open after shutdown");
    }
    assert_eq!(target.session_count(), 0);
    assert_eq!(dev.allocated_blocks(), 4 * 20 * 16);
}
