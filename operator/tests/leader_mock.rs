//! Leader election against kube's mock service (tower-test): the exact
//! request sequence matters here (a write without a fresh resourceVersion,
//! or a write while another replica holds a live lease, would be a bug).

use egressguard_operator::leader::{Leader, LEASE_SECONDS};
use http::{Request, Response};
use kube::client::Body;
use kube::Client;
use serde_json::{json, Value};

const PATH: &str = "/apis/coordination.k8s.io/v1/namespaces/ns/leases/egressguard-operator";

async fn body_json(req: Request<Body>) -> Value {
    let bytes = req.into_body().collect_bytes().await.expect("request body");
    serde_json::from_slice(&bytes).expect("json body")
}

fn respond(code: u16, v: &Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .body(Body::from(v.to_string().into_bytes()))
        .expect("response")
}

fn lease(holder: &str, renew: &str, rv: &str) -> Value {
    json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
           "metadata": {"name": "egressguard-operator", "namespace": "ns", "resourceVersion": rv},
           "spec": {"holderIdentity": holder, "leaseDurationSeconds": LEASE_SECONDS, "renewTime": renew}})
}

#[tokio::test]
async fn acquires_a_missing_lease_then_yields_to_a_live_holder_then_takes_an_expired_one() {
    let (mock, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(mock, "default");
    let server = tokio::spawn(async move {
        // 1. No lease yet: GET 404, then a create naming us.
        let (req, send) = handle.next_request().await.expect("GET");
        assert_eq!((req.method().as_str(), req.uri().path()), ("GET", PATH));
        send.send_response(respond(404, &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404})));
        let (req, send) = handle.next_request().await.expect("POST");
        assert_eq!(
            (req.method().as_str(), req.uri().path()),
            ("POST", "/apis/coordination.k8s.io/v1/namespaces/ns/leases")
        );
        let created = body_json(req).await;
        assert_eq!(created["spec"]["holderIdentity"], "me");
        assert_eq!(created["spec"]["leaseDurationSeconds"], LEASE_SECONDS);
        assert!(created["spec"]["acquireTime"].is_string());
        send.send_response(respond(201, &created));

        // 2. Another replica renewed just now: no write at all.
        let (req, send) = handle.next_request().await.expect("GET");
        assert_eq!(req.method(), "GET");
        let now = k8s_openapi::jiff::Timestamp::now().to_string();
        send.send_response(respond(200, &lease("other", &now, "7")));

        // 3. The other replica stopped renewing: replace with its resourceVersion.
        let (req, send) = handle.next_request().await.expect("GET");
        assert_eq!(req.method(), "GET");
        send.send_response(respond(200, &lease("other", "2020-01-01T00:00:00Z", "8")));
        let (req, send) = handle.next_request().await.expect("PUT");
        assert_eq!((req.method().as_str(), req.uri().path()), ("PUT", PATH));
        let replaced = body_json(req).await;
        assert_eq!(
            replaced["metadata"]["resourceVersion"], "8",
            "takeover must be conditional on the seen version"
        );
        assert_eq!(replaced["spec"]["holderIdentity"], "me");
        send.send_response(respond(200, &replaced));
        handle
    });
    let mut leader = Leader::new(client, "ns", "egressguard-operator", "me");
    assert!(leader.try_lead().await, "a missing lease is acquired");
    assert!(
        !leader.try_lead().await,
        "a live lease held by another replica is respected"
    );
    assert!(leader.try_lead().await, "an expired lease is taken over");
    let mut handle = server.await.expect("mock server");
    // Nothing else was sent.
    let extra =
        tokio::time::timeout(std::time::Duration::from_millis(100), handle.next_request()).await;
    assert!(
        extra.is_err() || extra.is_ok_and(|r| r.is_none()),
        "unexpected extra request"
    );
}

#[tokio::test]
async fn a_conflicting_takeover_is_not_leadership() {
    let (mock, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(mock, "default");
    let server = tokio::spawn(async move {
        let (_, send) = handle.next_request().await.expect("GET");
        send.send_response(respond(200, &lease("other", "2020-01-01T00:00:00Z", "3")));
        let (req, send) = handle.next_request().await.expect("PUT");
        assert_eq!(req.method(), "PUT");
        // A racing replica won: the API server answers 409.
        send.send_response(respond(409, &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Conflict", "code": 409})));
    });
    let mut leader = Leader::new(client, "ns", "egressguard-operator", "me");
    assert!(!leader.try_lead().await);
    server.await.expect("mock server");
}
