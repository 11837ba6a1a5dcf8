//! Operability: gRPC health and reflection, Prometheus metrics, liveness/readiness, graceful shutdown.

use medfleet_e2e::{Backend, TestServer, both_backends, http_get};
use medfleet_proto::v1;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

async fn observability(backend: Backend) {
    let server = TestServer::start(backend).await;
    let channel = server.channel(&server.admin_bundle()).await.unwrap();

    let reply = HealthClient::new(channel.clone())
        .check(HealthCheckRequest {
            service: "medfleet.v1.RegistryService".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.status(), ServingStatus::Serving);

    // Reflection lists our services (what grpcurl uses).
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = ServerReflectionClient::new(channel.clone())
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = stream.message().await.unwrap().expect("a reflection reply");
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection reply: {response:?}");
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    assert!(names.contains(&"medfleet.v1.RegistryService"), "{names:?}");
    assert!(names.contains(&"grpc.health.v1.Health"), "{names:?}");

    // A request id given by the caller comes back; metrics count the call by method and code.
    let mut api = medfleet_proto::v1::registry_service_client::RegistryServiceClient::new(channel);
    let mut request = tonic::Request::new(v1::GetSiteRequest { name: "nowhere".into() });
    request
        .metadata_mut()
        .insert("x-request-id", "test-req-42".parse().unwrap());
    let status = api.get_site(request).await.unwrap_err();
    assert_eq!(status.metadata().get("x-request-id").unwrap(), "test-req-42");
    let (code, metrics) = http_get(server.http_addr, "/metrics").await;
    assert_eq!(code, 200);
    assert!(
        metrics
            .contains(r#"medfleet_rpc_requests_total{code="NotFound",method="/medfleet.v1.RegistryService/GetSite""#),
        "{metrics}"
    );
    assert!(metrics.contains("medfleet_rpc_duration_seconds_bucket"), "{metrics}");

    assert_eq!(http_get(server.http_addr, "/healthz").await, (200, "ok\n".to_owned()));
    assert_eq!(http_get(server.http_addr, "/readyz").await, (200, "ready\n".to_owned()));
    assert_eq!(http_get(server.http_addr, "/nope").await.0, 404);
}
both_backends!(health_reflection_metrics, observability);

async fn graceful_shutdown(backend: Backend) {
    let server = TestServer::start(backend).await;
    let grpc_addr = server.grpc_addr;
    let channel = server.channel(&server.admin_bundle()).await.unwrap();
    let mut watch = HealthClient::new(channel)
        .watch(HealthCheckRequest::default())
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert_eq!(first.status(), ServingStatus::Serving);

    let stopping = tokio::spawn(server.stop());
    // Open streams are told before the server goes away...
    let next = watch.message().await.unwrap().expect("a status update during shutdown");
    assert_eq!(next.status(), ServingStatus::NotServing);
    // ...and once the client lets go, shutdown completes without waiting for the drain deadline.
    drop(watch);
    stopping.await.unwrap().expect("clean shutdown");
    assert!(
        tokio::net::TcpStream::connect(grpc_addr).await.is_err(),
        "the listener still accepts connections after shutdown"
    );
}
both_backends!(graceful_shutdown_reports_not_serving, graceful_shutdown);
