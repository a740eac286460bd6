//! `PUT /v1/domains/{name}/forwarding` through dns's real admin API.

use anyhow::Result;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tether_tests::stack::{OPERATOR_TOKEN, Stack};

fn code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or("<no error code>")
}

#[tokio::test]
async fn forwarding_settings_are_validated_and_returned() -> Result<()> {
    let (stack, acme) = Stack::with_acme().await?;
    stack.domain(&acme, json!({ "name": "fwd.tether.test", "static_ip": "127.0.46.1" })).await?;
    let api = &stack.api;
    let path = "/v1/domains/fwd.tether.test/forwarding";

    let (status, body) = api.call(Method::PUT, path, Some(&acme), Some(json!({}))).await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body,
        json!({ "ports": [], "policy": "round_robin", "proxy_protocol": "off", "max_flows": 10000,
                "max_flows_per_client": 100 }),
        "defaults"
    );

    let update = json!({ "ports": [8443, 443], "policy": "least_connections", "proxy_protocol": "tcp" });
    let (status, body) = api.call(Method::PUT, path, Some(&acme), Some(update)).await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["ports"], json!([443, 8443]));
    assert_eq!(body["policy"], "least_connections");
    // Fields left out keep their value.
    let (status, body) = api.call(Method::PUT, path, Some(&acme), Some(json!({ "max_flows": 50 }))).await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!((body["ports"].clone(), body["proxy_protocol"].clone()), (json!([443, 8443]), json!("tcp")));
    // Lowering max_flows alone lowers the per-client cap with it.
    assert_eq!((body["max_flows"].as_i64(), body["max_flows_per_client"].as_i64()), (Some(50), Some(50)));

    for (bad, why) in [
        (json!({ "ports": [0] }), "0 is not a port"),
        (json!({ "ports": [80, 80] }), "listed twice"),
        (json!({ "ports": [70000] }), "ports"),
        (json!({ "policy": "fastest" }), "policy"),
        (json!({ "proxy_protocol": "v1" }), "proxy_protocol"),
        (json!({ "max_flows": 0 }), "max_flows"),
        (json!({ "max_flows_per_client": 51 }), "above max_flows (50)"),
        (json!({ "port": [80] }), "port"),
    ] {
        let (status, body) = api.call(Method::PUT, path, Some(&acme), Some(bad.clone())).await?;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{bad}: {body}");
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(why), "{bad}: {message}");
    }
    let (status, _) = api.raw(Method::PUT, path, Some(&acme), Some("application/json"), "{").await?;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    // Who may: the owner and the operator, no one else.
    let (status, body) = api.call(Method::PUT, path, None, Some(json!({}))).await?;
    assert_eq!((status, code(&body)), (StatusCode::UNAUTHORIZED, "unauthorized"));
    let globex = stack.subscriber("globex").await?;
    let (status, body) = api.call(Method::PUT, path, Some(&globex), Some(json!({}))).await?;
    assert_eq!((status, code(&body)), (StatusCode::FORBIDDEN, "forbidden"));
    let (status, body) = api.call(Method::PUT, path, Some(OPERATOR_TOKEN), Some(json!({ "ports": [] }))).await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["ports"], json!([]));
    let missing = "/v1/domains/nope.tether.test/forwarding";
    let (status, body) = api.call(Method::PUT, missing, Some(&acme), Some(json!({}))).await?;
    assert_eq!((status, code(&body)), (StatusCode::NOT_FOUND, "not_found"));

    // Documented.
    let (_, spec) = api.call(Method::GET, "/v1/openapi.json", None, None).await?;
    assert!(spec["paths"]["/v1/domains/{name}/forwarding"]["put"].is_object());
    Ok(())
}
