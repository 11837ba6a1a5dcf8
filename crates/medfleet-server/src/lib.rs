//! medfleetd, the medfleet control plane: gRPC over mutual TLS, the certificate authority, storage on SQLite or
//! PostgreSQL, and telemetry. [`run`] serves one replica; any number of replicas may share one PostgreSQL.

pub mod audit;
pub mod authz;
pub mod clinical;
pub mod device_config;
pub mod devices;
pub mod emr;
pub mod error;
pub mod identity;
pub mod persistence;
pub mod registry;
pub mod retention;
pub mod settings;
pub mod telemetry;
pub mod transport;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use medfleet_proto::v1::access_service_server::AccessServiceServer;
use medfleet_proto::v1::audit_service_server::AuditServiceServer;
use medfleet_proto::v1::config_service_server::ConfigServiceServer;
use medfleet_proto::v1::credential_service_server::CredentialServiceServer;
use medfleet_proto::v1::device_service_server::DeviceServiceServer;
use medfleet_proto::v1::emr_service_server::EmrServiceServer;
use medfleet_proto::v1::enrollment_service_server::EnrollmentServiceServer;
use medfleet_proto::v1::feed_service_server::FeedServiceServer;
use medfleet_proto::v1::observation_service_server::ObservationServiceServer;
use medfleet_proto::v1::patient_service_server::PatientServiceServer;
use medfleet_proto::v1::registry_service_server::RegistryServiceServer;
use tokio::net::TcpListener;
use tonic::transport::Server;

use crate::audit::grpc as audit_api;
use crate::authz::{access, grpc as access_api};
use crate::clinical::grpc as clinical_api;
use crate::device_config::{grpc as config_api, store as configs};
use crate::devices::session::DeviceApi;
use crate::devices::{ingest, session};
use crate::emr::destinations;
use crate::identity::credentials::{Credentials, Lifetimes};
use crate::identity::grpc::IdentityApi;
use crate::identity::pki::{DataDir, InitOutcome, IssuedCertificate, PkiError};
use crate::identity::revocation::Revocations;
use crate::identity::secrets::{Secrets, SecretsError};
use crate::identity::{pki, secrets};
use crate::persistence::{db, events};
use crate::registry::grpc::RegistryApi;
use crate::registry::store::Registry;
use crate::settings::Settings;
use crate::telemetry::{Metrics, TelemetryError};
use crate::transport::rpc::RpcLayer;
use crate::transport::tls::TlsError;
use crate::transport::{http, limits, rpc, server_cert, tls};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error(transparent)]
    Secrets(#[from] SecretsError),
    #[error(transparent)]
    File(#[from] crate::identity::files::FileError),
    #[error("re-encrypting stored secrets: {0}")]
    Reseal(error::Error),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("database: {0}")]
    Database(#[from] sea_orm::DbErr),
    #[error(transparent)]
    Telemetry(#[from] TelemetryError),
    #[error("listener: {0}")]
    Io(#[from] std::io::Error),
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("gRPC reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error(transparent)]
    Access(access::AccessError),
}

/// The two sockets a replica serves: gRPC (mTLS) and plain HTTP for operations.
#[derive(Debug)]
pub struct Listeners {
    pub grpc: TcpListener,
    pub http: TcpListener,
}

impl Listeners {
    pub async fn bind(config: &Settings) -> std::io::Result<Self> {
        Ok(Self {
            grpc: TcpListener::bind(config.listen).await?,
            http: TcpListener::bind(config.http_listen).await?,
        })
    }
}

/// Creates the data directory (secrets keyring, CA, server certificate, first admin) if it holds no CA yet.
pub fn ensure_initialised(config: &Settings, admin: &str) -> Result<Option<InitOutcome>, ServeError> {
    let dir = DataDir::new(&config.data_dir);
    if dir.is_initialised() {
        return Ok(None);
    }
    let secrets = Secrets::new(dir.open_keyring(&config.secrets_key_file)?);
    Ok(Some(dir.init(
        admin,
        &config.server_names,
        config.server_cert_lifetime,
        config.operator_cert_lifetime,
        &secrets,
    )?))
}

/// What `medfleetd rotate-secrets-key --retire-unused` found and did.
#[derive(Debug, Clone, Default)]
pub struct Retirement {
    pub retired: Vec<String>,
    /// Old keys something still uses (re-encrypted at the next start of a replica with the current key first).
    pub still_used: Vec<String>,
    /// Destination secrets still in clear (an older medfleetd's; sealed at the next start).
    pub plaintext: bool,
}

/// Removes from the keyring every old key that no stored secret uses: not the CA key in this data directory, not
/// any destination secret in the database. The current key always stays.
pub async fn retire_unused_keys(config: &Settings) -> Result<Retirement, ServeError> {
    let dir = DataDir::new(&config.data_dir);
    let keyring = secrets::load(&config.secrets_key_file)?;
    db::migrate(&config.database_url).await?;
    let db = db::connect(&config.database_url, 1).await?;
    let (mut in_use, plaintext) = destinations::key_ids_in_use(&db).await.map_err(ServeError::Reseal)?;
    db.close().await?;
    in_use.extend(dir.ca_key_kid()?);
    let retired = secrets::retire_unused(&config.secrets_key_file, &in_use)?;
    let current = keyring.current().id();
    Ok(Retirement {
        retired,
        still_used: in_use.into_iter().filter(|kid| kid != current).collect(),
        plaintext,
    })
}

/// Records the first admin's certificate so it can be revoked like any other. Best effort: a missing or unreadable
/// file only means that certificate cannot be revoked individually (it still expires).
async fn record_bootstrap_admin(dir: &DataDir, ca: &pki::CertificateAuthority, credentials: &Credentials) {
    let Ok(pem) = std::fs::read_to_string(dir.admin_cert()) else {
        return;
    };
    let recorded = match IssuedCertificate::from_pem(&pem, ca.cert_pem()) {
        Ok((identity, issued)) => credentials
            .record_bootstrap(&identity, &issued)
            .await
            .map_err(|e| e.to_string()),
        Err(error) => Err(error),
    };
    if let Err(error) = recorded {
        tracing::warn!(%error, path = %dir.admin_cert().display(), "could not record the first admin's certificate");
    }
}

/// Serves until `shutdown` completes, then stops accepting, reports NOT_SERVING, lets open streams drain for
/// `config.shutdown_grace` and closes the database pool.
pub async fn run(
    config: Settings,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let dir = DataDir::new(&config.data_dir);
    let secrets = Arc::new(Secrets::new(dir.open_keyring(&config.secrets_key_file)?));
    if config.secrets_key_file.starts_with(dir.root()) {
        // The default suits a first start, not production: a copy of the data directory (a backup, a stolen
        // volume) would carry the key beside the sealed CA key it opens.
        tracing::warn!(
            path = %config.secrets_key_file.display(),
            "the secrets keyring is inside the data directory; keep it apart (secrets_key_file: a systemd \
             credential, a Kubernetes Secret, another mount) so a copy of the data directory cannot open the CA key"
        );
    }
    let ca_key = dir.protect_ca_key(&secrets)?.map(|change| {
        let text = match change {
            pki::CaKeyChange::Sealed { kid } => format!("sealed from plaintext under key {kid}"),
            pki::CaKeyChange::Resealed { from, kid } => format!("re-encrypted from key {from} to {kid}"),
        };
        tracing::info!(path = %dir.ca_key_sealed().display(), change = %text, "CA key at rest");
        text
    });
    let ca = Arc::new(dir.load_ca(secrets.keyring())?);
    let server_credentials = dir.server_credentials(&ca, &config.server_names, config.server_cert_lifetime)?;
    let server_certificate = tls::ServerCertificate::new(&server_credentials)?;

    db::migrate(&config.database_url).await?;
    let db = db::connect(&config.database_url, config.database_max_connections).await?;
    destinations::reseal(&db, &secrets, ca_key.as_deref())
        .await
        .map_err(ServeError::Reseal)?;
    let revocations = Revocations::new();
    revocations.refresh(&db).await?;
    let background = tokio_util::sync::CancellationToken::new();
    // An early return (a bind or start-up error after some tasks started) must stop them too, not leak them.
    let _stop_background = background.clone().drop_guard();
    revocations.spawn_poller(db.clone(), background.clone());
    let tls_config = tls::server_config(ca.cert_der(), server_certificate.clone(), revocations.clone())?;
    let credentials = Credentials::new(
        db.clone(),
        ca.clone(),
        Lifetimes {
            device: config.device_cert_lifetime,
            operator: config.operator_cert_lifetime,
            service: config.service_cert_lifetime,
        },
        revocations.clone(),
    );
    record_bootstrap_admin(&dir, &ca, &credentials).await;
    let access = access::Access::load(db.clone()).await.map_err(ServeError::Access)?;
    access.spawn_poller(background.clone());
    let refusals = rpc::Refusals::new(db.clone(), rpc::REFUSAL_WINDOW);
    refusals.spawn_flusher(background.clone());
    // HIPAA 164.312(b): reads of patient data are audited like writes, coalesced per reader and patient.
    let phi_reads = audit::Coalescer::new(db.clone(), clinical_api::PHI_READ_WINDOW);
    phi_reads.spawn_flusher(background.clone());
    let metrics = Metrics::new(config.otlp_endpoint.as_deref())?;
    server_cert::Renewer {
        dir: dir.clone(),
        ca: ca.clone(),
        names: config.server_names.clone(),
        lifetime: config.server_cert_lifetime,
        certificate: server_certificate,
        metrics: metrics.clone(),
    }
    .spawn(&server_credentials, background.clone());
    let events = events::Events::new(db.get_database_backend());
    events.spawn_listener(&db, background.clone());
    let hub = session::Hub::new(
        db.clone(),
        events.clone(),
        config.replica_name.clone(),
        session::SessionSettings {
            heartbeat_timeout: config.heartbeat_timeout,
            reconcile_interval: config.config_reconcile_interval,
        },
        metrics.clone(),
    );
    hub.spawn(background.clone());
    let configs = configs::Configs::new(db.clone(), events.clone());
    let clinical = clinical::Clinical::new(db.clone(), events.clone(), config.reading_future_tolerance);
    clinical.spawn_backlog(background.clone());
    let ingest = ingest::Ingest::spawn(clinical.clone(), metrics.clone(), background.clone());
    let emr = emr::Emr::new(
        db.clone(),
        events.clone(),
        metrics.clone(),
        config.replica_name.clone(),
        config.emr_retry_max,
        config.emr_allowed_hosts.clone(),
        secrets.clone(),
    );
    let relays = emr.spawn_relays(background.clone());
    retention::Retention::new(db.clone(), config.retention, metrics.clone()).spawn(background.clone());
    let ready = Arc::new(AtomicBool::new(false));

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<RegistryServiceServer<RegistryApi>>().await;
    health.set_serving::<EnrollmentServiceServer<IdentityApi>>().await;
    health.set_serving::<CredentialServiceServer<IdentityApi>>().await;
    health.set_serving::<DeviceServiceServer<DeviceApi>>().await;
    health.set_serving::<AccessServiceServer<access_api::AccessApi>>().await;
    health.set_serving::<AuditServiceServer<audit_api::AuditApi>>().await;
    health.set_serving::<ConfigServiceServer<config_api::ConfigApi>>().await;
    health
        .set_serving::<PatientServiceServer<clinical_api::ClinicalApi>>()
        .await;
    health
        .set_serving::<ObservationServiceServer<clinical_api::ClinicalApi>>()
        .await;
    health
        .set_serving::<EmrServiceServer<clinical_api::ClinicalApi>>()
        .await;
    health
        .set_serving::<FeedServiceServer<clinical_api::ClinicalApi>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(medfleet_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(medfleet_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    let registry = Registry::new(db.clone());
    let identity_api = IdentityApi::new(credentials.clone());
    // A CSR and a token are a few KiB: nothing larger reaches the one unauthenticated method.
    let enrollment =
        EnrollmentServiceServer::new(identity_api.clone()).max_decoding_message_size(limits::ENROLL_MESSAGE);
    let credential_service = CredentialServiceServer::new(identity_api);
    // A reading batch of ingest::MAX_ITEMS items is well under this; larger ends the stream with RESOURCE_EXHAUSTED.
    let device_service = DeviceServiceServer::new(DeviceApi::new(registry.clone(), hub.clone(), ingest))
        .max_decoding_message_size(limits::DEVICE_MESSAGE);
    let registry = RegistryServiceServer::new(RegistryApi::new(registry, credentials, events.clone(), access.clone()));
    let config_service = ConfigServiceServer::new(config_api::ConfigApi::new(configs));
    let access_service = AccessServiceServer::new(access_api::AccessApi::new(db.clone(), access.clone()));
    let audit_service = AuditServiceServer::new(audit_api::AuditApi::new(db.clone()));
    let clinical_api = clinical_api::ClinicalApi::new(clinical, emr, access.clone(), phi_reads);
    let patient_service = PatientServiceServer::new(clinical_api.clone());
    let observation_service = ObservationServiceServer::new(clinical_api.clone());
    let emr_service = EmrServiceServer::new(clinical_api.clone());
    let feed_service = FeedServiceServer::new(clinical_api);

    let (draining_tx, draining) = tokio::sync::watch::channel(false);
    let ops = http::router(http::OpsState {
        metrics: metrics.clone(),
        db: db.clone(),
        ca: ca.clone(),
        revocations: revocations.clone(),
        ready: ready.clone(),
    });
    let http_addr = listeners.http.local_addr()?;
    let mut http_draining = draining.clone();
    let http_task = tokio::spawn(async move {
        axum::serve(listeners.http, ops)
            .with_graceful_shutdown(async move {
                let _ = http_draining.wait_for(|d| *d).await;
            })
            .await
    });

    let grpc_addr = listeners.grpc.local_addr()?;
    let incoming = tls::incoming(listeners.grpc, tls_config, revocations.clone(), metrics.clone());
    let signal = {
        let (health, ready) = (health.clone(), ready.clone());
        async move {
            shutdown.await;
            tracing::info!("shutting down: refusing new connections and draining open streams");
            ready.store(false, Ordering::Release);
            health.set_not_serving::<RegistryServiceServer<RegistryApi>>().await;
            health.set_not_serving::<EnrollmentServiceServer<IdentityApi>>().await;
            health.set_not_serving::<CredentialServiceServer<IdentityApi>>().await;
            health.set_not_serving::<DeviceServiceServer<DeviceApi>>().await;
            health
                .set_not_serving::<AccessServiceServer<access_api::AccessApi>>()
                .await;
            health
                .set_not_serving::<ConfigServiceServer<config_api::ConfigApi>>()
                .await;
            health
                .set_not_serving::<PatientServiceServer<clinical_api::ClinicalApi>>()
                .await;
            health
                .set_not_serving::<ObservationServiceServer<clinical_api::ClinicalApi>>()
                .await;
            health
                .set_not_serving::<EmrServiceServer<clinical_api::ClinicalApi>>()
                .await;
            health
                .set_not_serving::<FeedServiceServer<clinical_api::ClinicalApi>>()
                .await;
            health
                .set_service_status("", tonic_health::ServingStatus::NotServing)
                .await;
            let _ = draining_tx.send(true);
        }
    };
    let serve = Server::builder()
        .max_concurrent_streams(limits::STREAMS_PER_CONNECTION)
        .http2_keepalive_interval(Some(limits::KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(limits::KEEPALIVE_TIMEOUT))
        .max_connection_age(limits::MAX_CONNECTION_AGE)
        .max_connection_age_grace(limits::MAX_CONNECTION_AGE_GRACE)
        .timeout(limits::UNARY_TIMEOUT)
        .layer(RpcLayer::new(metrics.clone(), access.clone(), db.clone(), refusals))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(reflection_alpha)
        .add_service(enrollment)
        .add_service(credential_service)
        .add_service(device_service)
        .add_service(registry)
        .add_service(access_service)
        .add_service(audit_service)
        .add_service(config_service)
        .add_service(patient_service)
        .add_service(observation_service)
        .add_service(emr_service)
        .add_service(feed_service)
        .serve_with_incoming_shutdown(incoming, signal);
    let grace = config.shutdown_grace;
    let deadline = async move {
        let mut draining = draining;
        if draining.wait_for(|d| *d).await.is_err() {
            std::future::pending::<()>().await;
        }
        tokio::time::sleep(grace).await;
    };

    ready.store(true, Ordering::Release);
    tracing::info!(grpc = %grpc_addr, http = %http_addr, backend = ?db.get_database_backend(), replica = %config.replica_name, "medfleetd serving");
    let result = tokio::select! {
        result = serve => result.map_err(ServeError::from),
        () = deadline => {
            tracing::warn!(grace = ?grace, "drain deadline passed; closing the remaining streams");
            Ok(())
        }
    };
    match tokio::time::timeout(std::time::Duration::from_secs(5), http_task).await {
        Ok(Ok(Err(error))) => tracing::warn!(%error, "operations listener failed"),
        Ok(Err(error)) => tracing::warn!(%error, "operations listener task failed"),
        Err(_) => tracing::warn!("operations listener did not stop in time"),
        Ok(Ok(Ok(()))) => {}
    }
    background.cancel();
    // The relay hands its destination leases back before the pool closes, so another replica (or this one,
    // restarted) relays at once instead of after the lease runs out.
    if tokio::time::timeout(std::time::Duration::from_secs(5), relays)
        .await
        .is_err()
    {
        tracing::warn!("EMR relay leases not released within 5 s; they expire on their own");
    }
    metrics.shutdown();
    db.close().await?;
    tracing::info!("medfleetd stopped");
    result
}
