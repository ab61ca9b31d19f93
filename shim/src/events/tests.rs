use std::sync::Arc;

use containerd_shim_protos::protobuf::Message;

use async_trait::async_trait;
use containerd_shim_protos::events::task::{TaskExit, TaskStart};
use containerd_shim_protos::protobuf::well_known_types::empty::Empty;
use containerd_shim_protos::shim_async::{create_events, Events};
use ttrpc::asynchronous::Server;

use super::*;

/// A stand-in for containerd's event service that records what it gets.
#[derive(Default)]
struct Recorder {
    got: Mutex<Vec<Envelope>>,
}

#[async_trait]
impl Events for Recorder {
    async fn forward(
        &self,
        _ctx: &ttrpc::asynchronous::TtrpcContext,
        req: ForwardRequest,
    ) -> ttrpc::Result<Empty> {
        if let Some(env) = req.envelope.into_option() {
            beacon_common::lock(&self.got).push(env);
        }
        Ok(Empty::new())
    }
}

async fn serve(path: &std::path::Path, recorder: Arc<Recorder>) -> Server {
    let svc: Arc<dyn Events + Send + Sync> = recorder;
    let mut server = Server::new()
        .bind(&format!("unix://{}", path.display()))
        .expect("bind")
        .register_service(create_events(svc));
    server.start().await.expect("start");
    server
}

async fn wait_for(recorder: &Recorder, n: usize) -> Vec<Envelope> {
    for _ in 0..500 {
        let got = beacon_common::lock(&recorder.got).clone();
        if got.len() >= n {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!(
        "only {} of {n} events arrived",
        beacon_common::lock(&recorder.got).len()
    );
}

#[tokio::test]
async fn events_arrive_in_order_with_topic_namespace_and_payload() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("containerd.sock.ttrpc");
    let recorder = Arc::new(Recorder::default());
    let _server = serve(&sock, recorder.clone()).await;
    let publisher = Publisher::spawn(sock.display().to_string(), "ns1".into());
    publisher.publish(TaskEvent::Start {
        container_id: "c1".into(),
        pid: 7,
    });
    for i in 0..20 {
        publisher.publish(TaskEvent::Exit {
            container_id: "c1".into(),
            id: format!("e{i}"),
            pid: 7,
            exit_status: i,
            exited_at: SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000),
        });
    }
    let got = wait_for(&recorder, 21).await;
    assert_eq!(got[0].topic, "/tasks/start");
    assert_eq!(got[0].namespace, "ns1");
    let any = got[0].event.as_ref().expect("payload");
    assert_eq!(any.type_url, "containerd.events.TaskStart");
    let start = TaskStart::parse_from_bytes(&any.value).expect("decode");
    assert_eq!((start.container_id.as_str(), start.pid), ("c1", 7));
    for (i, env) in got[1..].iter().enumerate() {
        assert_eq!(env.topic, "/tasks/exit");
        let exit = TaskExit::parse_from_bytes(&env.event.as_ref().expect("payload").value)
            .expect("decode");
        assert_eq!(exit.id, format!("e{i}"), "in order");
        assert_eq!(exit.exit_status, i as u32);
        assert_eq!(exit.exited_at.seconds, 1_000_000);
    }
    publisher.close(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn events_wait_for_containerd_to_come_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("late.sock");
    let publisher = Publisher::spawn(sock.display().to_string(), "ns".into());
    publisher.publish(TaskEvent::Oom {
        container_id: "c2".into(),
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let recorder = Arc::new(Recorder::default());
    let _server = serve(&sock, recorder.clone()).await;
    let got = wait_for(&recorder, 1).await;
    assert_eq!(got[0].topic, "/tasks/oom");
}

#[test]
fn every_event_has_its_topic_and_type() {
    let t = SystemTime::UNIX_EPOCH;
    let all = [
        (
            TaskEvent::Create {
                container_id: "c".into(),
                bundle: "/b".into(),
                stdin: String::new(),
                stdout: "/o".into(),
                stderr: String::new(),
                terminal: false,
                pid: 1,
            },
            "/tasks/create",
            "containerd.events.TaskCreate",
        ),
        (
            TaskEvent::ExecAdded {
                container_id: "c".into(),
                exec_id: "e".into(),
            },
            "/tasks/exec-added",
            "containerd.events.TaskExecAdded",
        ),
        (
            TaskEvent::ExecStarted {
                container_id: "c".into(),
                exec_id: "e".into(),
                pid: 2,
            },
            "/tasks/exec-started",
            "containerd.events.TaskExecStarted",
        ),
        (
            TaskEvent::Paused {
                container_id: "c".into(),
            },
            "/tasks/paused",
            "containerd.events.TaskPaused",
        ),
        (
            TaskEvent::Resumed {
                container_id: "c".into(),
            },
            "/tasks/resumed",
            "containerd.events.TaskResumed",
        ),
        (
            TaskEvent::Delete {
                container_id: "c".into(),
                pid: 1,
                exit_status: 3,
                exited_at: t,
            },
            "/tasks/delete",
            "containerd.events.TaskDelete",
        ),
    ];
    for (event, topic, type_url) in all {
        assert_eq!(event.topic(), topic);
        let any = event.to_any();
        assert_eq!(any.type_url, type_url);
        assert!(!any.value.is_empty());
    }
}
