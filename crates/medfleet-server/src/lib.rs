//! medfleetd, the medfleet control plane: gRPC over mutual TLS, the certificate authority, storage on SQLite or
//! PostgreSQL, and telemetry. [`run`] serves one replica; any number of replicas may share one PostgreSQL.

pub mod audit;
pub mod authz;
pub mod clinical;
pub mod device_config;
pub mod devices;
pub mod emr;
pub mod error;
pub mod firmware;
pub mod identity;
pub mod persistence;
pub mod registry;
pub mod retention;
pub mod rollouts;
pub mod settings;
pub mod telemetry;
pub mod transport;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use medfleet_proto::v1::{
    self, access_service_server::AccessServiceServer, audit_service_server::AuditServiceServer,
    config_service_server::ConfigServiceServer, credential_service_server::CredentialServiceServer,
    device_service_server::DeviceServiceServer, emr_service_server::EmrServiceServer,
    enrollment_service_server::EnrollmentServiceServer, feed_service_server::FeedServiceServer,
    firmware_service_server::FirmwareServiceServer, observation_service_server::ObservationServiceServer,
    patient_service_server::PatientServiceServer, registry_service_server::RegistryServiceServer,
    rollout_service_server::RolloutServiceServer,
};
use sea_orm::DatabaseConnection;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::audit::grpc::AuditApi;
use crate::authz::access;
use crate::authz::grpc::AccessApi;
use crate::clinical::grpc::ClinicalApi;
use crate::device_config::grpc::ConfigApi;
use crate::device_config::store as configs;
use crate::devices::grpc::DeviceApi;
use crate::devices::{ingest, session};
use crate::emr::destinations;
use crate::emr::grpc::{EmrApi, FeedApi};
use crate::identity::credentials::{Credentials, Lifetimes};
use crate::identity::data_dir::{self, DataDir, InitOutcome};
use crate::identity::grpc::IdentityApi;
use crate::identity::pki::{self, IssuedCertificate, PkiError};
use crate::identity::revocation::Revocations;
use crate::identity::secrets::{self, Secrets, SecretsError};
use crate::persistence::{db, events};
use crate::registry::grpc::RegistryApi;
use crate::registry::store::Registry;
use crate::settings::Settings;
use crate::telemetry::{Metrics, TelemetryError};
use crate::transport::rpc::{self, RpcLayer};
use crate::transport::tls::{self, TlsError};
use crate::transport::{http, limits, server_cert};

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
    #[error("{0}")]
    ArtifactStore(String),
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
    pub async fn bind(settings: &Settings) -> std::io::Result<Self> {
        Ok(Self {
            grpc: TcpListener::bind(settings.listen).await?,
            http: TcpListener::bind(settings.http_listen).await?,
        })
    }
}

/// Creates the data directory (secrets keyring, CA, server certificate, first admin) if it holds no CA yet.
pub fn ensure_initialised(settings: &Settings, admin: &str) -> Result<Option<InitOutcome>, ServeError> {
    let dir = DataDir::new(&settings.data_dir);
    if dir.is_initialised() {
        return Ok(None);
    }
    let secrets = Secrets::new(dir.open_keyring(&settings.secrets_key_file)?);
    Ok(Some(dir.init(
        admin,
        &settings.server_names,
        settings.server_cert_lifetime,
        settings.operator_cert_lifetime,
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
pub async fn retire_unused_keys(settings: &Settings) -> Result<Retirement, ServeError> {
    let dir = DataDir::new(&settings.data_dir);
    let keyring = secrets::load(&settings.secrets_key_file)?;
    db::migrate(&settings.database_url).await?;
    let db = db::connect(&settings.database_url, 1).await?;
    let (mut in_use, plaintext) = destinations::key_ids_in_use(&db).await.map_err(ServeError::Reseal)?;
    db.close().await?;
    in_use.extend(dir.ca_key_kid()?);
    let retired = secrets::retire_unused(&settings.secrets_key_file, &in_use)?;
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

/// Every gRPC service a replica serves, by name: the health service reports each, and each turns NOT_SERVING
/// the moment shutdown starts (a test checks the list against the proto, so a new service cannot be left out).
pub const SERVICES: [&str; 13] = [
    v1::registry_service_server::SERVICE_NAME,
    v1::enrollment_service_server::SERVICE_NAME,
    v1::credential_service_server::SERVICE_NAME,
    v1::device_service_server::SERVICE_NAME,
    v1::access_service_server::SERVICE_NAME,
    v1::audit_service_server::SERVICE_NAME,
    v1::config_service_server::SERVICE_NAME,
    v1::patient_service_server::SERVICE_NAME,
    v1::observation_service_server::SERVICE_NAME,
    v1::emr_service_server::SERVICE_NAME,
    v1::feed_service_server::SERVICE_NAME,
    v1::firmware_service_server::SERVICE_NAME,
    v1::rollout_service_server::SERVICE_NAME,
];

async fn report_health(health: &HealthReporter, status: ServingStatus) {
    for service in SERVICES {
        health.set_service_status(service, status).await;
    }
}

/// The key material a replica serves with, opened and brought up to date (sealed under the current key).
struct KeyMaterial {
    dir: DataDir,
    secrets: Arc<Secrets>,
    ca: Arc<pki::CertificateAuthority>,
    /// What start-up did to the CA key at rest, for the audit trail.
    ca_key_change: Option<String>,
    server_credentials: data_dir::ServerCredentials,
    server_certificate: Arc<tls::ServerCertificate>,
}

impl KeyMaterial {
    fn open(settings: &Settings) -> Result<Self, ServeError> {
        let dir = DataDir::new(&settings.data_dir);
        let secrets = Arc::new(Secrets::new(dir.open_keyring(&settings.secrets_key_file)?));
        if settings.secrets_key_file.starts_with(dir.root()) {
            // The default suits a first start, not production: a copy of the data directory (a backup, a stolen
            // volume) would carry the key beside the sealed CA key it opens.
            tracing::warn!(
                path = %settings.secrets_key_file.display(),
                "the secrets keyring is inside the data directory; keep it apart (secrets_key_file: a systemd \
                 credential, a Kubernetes Secret, another mount) so a copy of the data directory cannot open the CA key"
            );
        }
        let ca_key_change = dir.protect_ca_key(&secrets)?.map(|change| {
            let text = match change {
                data_dir::CaKeyChange::Sealed { kid } => format!("sealed from plaintext under key {kid}"),
                data_dir::CaKeyChange::Resealed { from, kid } => format!("re-encrypted from key {from} to {kid}"),
            };
            tracing::info!(path = %dir.ca_key_sealed().display(), change = %text, "CA key at rest");
            text
        });
        let ca = Arc::new(dir.load_ca(secrets.keyring())?);
        let server_credentials = dir.server_credentials(&ca, &settings.server_names, settings.server_cert_lifetime)?;
        let server_certificate = tls::ServerCertificate::new(&server_credentials)?;
        Ok(Self {
            dir,
            secrets,
            ca,
            ca_key_change,
            server_credentials,
            server_certificate,
        })
    }
}

/// Migrates the schema, connects, and re-encrypts destination secrets stored under an older key (or in clear).
async fn open_database(settings: &Settings, keys: &KeyMaterial) -> Result<DatabaseConnection, ServeError> {
    db::migrate(&settings.database_url).await?;
    let db = db::connect(&settings.database_url, settings.database_max_connections).await?;
    destinations::reseal(&db, &keys.secrets, keys.ca_key_change.as_deref())
        .await
        .map_err(ServeError::Reseal)?;
    Ok(db)
}

/// Every capability of a running replica, with its background tasks started under one cancellation token.
struct Replica {
    db: DatabaseConnection,
    metrics: Metrics,
    revocations: Arc<Revocations>,
    credentials: Credentials,
    access: Arc<access::Access>,
    refusals: rpc::Refusals,
    phi_reads: audit::Coalescer,
    events: Arc<events::Events>,
    hub: Arc<session::Hub>,
    configs: configs::Configs,
    clinical: clinical::Clinical,
    ingest: ingest::Ingest,
    emr: Arc<emr::Emr>,
    /// The EMR relays; awaited on shutdown so they hand their leases back before the pool closes.
    relays: tokio::task::JoinHandle<()>,
    artifacts: firmware::artifacts::Artifacts,
    rollouts: rollouts::store::Rollouts,
    /// The rollout scheduler; awaited on shutdown so it hands its lease back.
    scheduler: tokio::task::JoinHandle<()>,
}

impl Replica {
    async fn start(
        settings: &Settings,
        keys: &KeyMaterial,
        db: DatabaseConnection,
        background: &CancellationToken,
    ) -> Result<Self, ServeError> {
        let revocations = Revocations::new();
        revocations.refresh(&db).await?;
        revocations.spawn_poller(db.clone(), background.clone());
        let credentials = Credentials::new(
            db.clone(),
            keys.ca.clone(),
            Lifetimes {
                device: settings.device_cert_lifetime,
                operator: settings.operator_cert_lifetime,
                service: settings.service_cert_lifetime,
            },
            revocations.clone(),
        );
        record_bootstrap_admin(&keys.dir, &keys.ca, &credentials).await;
        let access = access::Access::load(db.clone()).await.map_err(ServeError::Access)?;
        access.spawn_poller(background.clone());
        let refusals = rpc::Refusals::new(db.clone(), rpc::REFUSAL_WINDOW);
        refusals.spawn_flusher(background.clone());
        // HIPAA 164.312(b): reads of patient data are audited like writes, coalesced per reader and patient.
        let phi_reads = audit::Coalescer::new(db.clone(), audit::phi::PHI_READ_WINDOW);
        phi_reads.spawn_flusher(background.clone());
        let metrics = Metrics::new(settings.otlp_endpoint.as_deref())?;
        server_cert::Renewer {
            dir: keys.dir.clone(),
            ca: keys.ca.clone(),
            names: settings.server_names.clone(),
            lifetime: settings.server_cert_lifetime,
            certificate: keys.server_certificate.clone(),
            metrics: metrics.clone(),
        }
        .spawn(&keys.server_credentials, background.clone());
        let events = events::Events::new(db.get_database_backend());
        events.spawn_listener(&db, background.clone());
        let hub = session::Hub::new(
            db.clone(),
            events.clone(),
            settings.replica_name.clone(),
            session::SessionSettings {
                heartbeat_timeout: settings.heartbeat_timeout,
                reconcile_interval: settings.config_reconcile_interval,
            },
            metrics.clone(),
        );
        hub.spawn(background.clone());
        let configs = configs::Configs::new(db.clone(), events.clone());
        let clinical = clinical::Clinical::new(db.clone(), events.clone(), settings.reading_future_tolerance);
        clinical.spawn_backlog(background.clone());
        let ingest = ingest::Ingest::spawn(clinical.clone(), metrics.clone(), background.clone());
        let emr = emr::Emr::new(
            db.clone(),
            events.clone(),
            metrics.clone(),
            settings.replica_name.clone(),
            settings.emr_retry_max,
            settings.emr_allowed_hosts.clone(),
            keys.secrets.clone(),
        );
        let relays = emr.spawn_relays(background.clone());
        retention::Retention::new(db.clone(), settings.retention, metrics.clone()).spawn(background.clone());
        let repository = firmware::repository::Repository::new(db.clone(), keys.secrets.clone(), metrics.clone());
        repository.spawn_refresher(background.clone());
        let objects = settings
            .artifact_store
            .as_deref()
            .map(firmware::objects::Objects::open)
            .transpose()
            .map_err(ServeError::ArtifactStore)?;
        firmware::artifacts::spawn_sweeper(db.clone(), objects.clone(), background.clone());
        let artifacts = firmware::artifacts::Artifacts::new(db.clone(), repository, settings.upload_idle, objects);
        let rollouts = rollouts::store::Rollouts::new(db.clone(), events.clone(), artifacts.clone());
        let scheduler = rollouts::scheduler::Scheduler::new(
            db.clone(),
            events.clone(),
            metrics.clone(),
            format!("{} {}", settings.replica_name, uuid::Uuid::new_v4().simple()),
            settings.rollout_tick,
        )
        .spawn(background.clone());
        Ok(Self {
            db,
            metrics,
            revocations,
            credentials,
            access,
            refusals,
            phi_reads,
            events,
            hub,
            configs,
            clinical,
            ingest,
            emr,
            relays,
            artifacts,
            rollouts,
            scheduler,
        })
    }

    /// The gRPC server with every service behind the RPC layer, each with its message-size bound, and the
    /// reporter of their health (all SERVING).
    async fn grpc(&self) -> Result<(HealthReporter, GrpcRouter), ServeError> {
        let (health, health_service) = tonic_health::server::health_reporter();
        report_health(&health, ServingStatus::Serving).await;
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(medfleet_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()?;
        let reflection_alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(medfleet_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1alpha()?;
        let registry = Registry::new(self.db.clone());
        let identity_api = IdentityApi::new(self.credentials.clone());
        // A CSR and a token are a few KiB: nothing larger reaches the one unauthenticated method.
        let enrollment =
            EnrollmentServiceServer::new(identity_api.clone()).max_decoding_message_size(limits::ENROLL_MESSAGE);
        // A reading batch of ingest::MAX_ITEMS items is well under this; larger ends the stream with
        // RESOURCE_EXHAUSTED.
        let devices = DeviceServiceServer::new(DeviceApi::new(registry.clone(), self.hub.clone(), self.ingest.clone()))
            .max_decoding_message_size(limits::DEVICE_MESSAGE);
        let clinical = ClinicalApi::new(self.clinical.clone(), self.phi_reads.clone());
        let router = Server::builder()
            .max_concurrent_streams(limits::STREAMS_PER_CONNECTION)
            .http2_keepalive_interval(Some(limits::KEEPALIVE_INTERVAL))
            .http2_keepalive_timeout(Some(limits::KEEPALIVE_TIMEOUT))
            .max_connection_age(limits::MAX_CONNECTION_AGE)
            .max_connection_age_grace(limits::MAX_CONNECTION_AGE_GRACE)
            .layer(RpcLayer::new(
                self.metrics.clone(),
                self.access.clone(),
                self.db.clone(),
                self.refusals.clone(),
            ))
            .add_service(health_service)
            .add_service(reflection)
            .add_service(reflection_alpha)
            .add_service(enrollment)
            .add_service(CredentialServiceServer::new(identity_api))
            .add_service(devices)
            .add_service(RegistryServiceServer::new(RegistryApi::new(
                registry,
                self.credentials.clone(),
                self.events.clone(),
                self.access.clone(),
            )))
            .add_service(AccessServiceServer::new(AccessApi::new(
                self.db.clone(),
                self.access.clone(),
            )))
            .add_service(AuditServiceServer::new(AuditApi::new(self.db.clone())))
            .add_service(ConfigServiceServer::new(ConfigApi::new(self.configs.clone())))
            .add_service(PatientServiceServer::new(clinical.clone()))
            .add_service(ObservationServiceServer::new(clinical))
            .add_service(EmrServiceServer::new(EmrApi::new(self.emr.clone())))
            .add_service(FeedServiceServer::new(FeedApi::new(
                self.emr.clone(),
                self.access.clone(),
                self.phi_reads.clone(),
            )))
            // An upload's header carries the signed targets metadata (up to 8 MiB); chunks are 1 MiB.
            .add_service(
                FirmwareServiceServer::new(firmware::grpc::FirmwareApi::new(
                    self.db.clone(),
                    self.artifacts.clone(),
                ))
                .max_decoding_message_size(limits::FIRMWARE_MESSAGE),
            )
            .add_service(RolloutServiceServer::new(rollouts::grpc::RolloutApi::new(
                self.rollouts.clone(),
            )));
        Ok((health, router))
    }
}

type GrpcRouter = tonic::transport::server::Router<tower::layer::util::Stack<RpcLayer, tower::layer::util::Identity>>;

/// Serves until `shutdown` completes, then stops accepting, reports NOT_SERVING, lets open streams drain for
/// `settings.shutdown_grace` and closes the database pool.
pub async fn run(
    settings: Settings,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let keys = KeyMaterial::open(&settings)?;
    let db = open_database(&settings, &keys).await?;
    let background = CancellationToken::new();
    // An early return (a bind or start-up error after some tasks started) must stop them too, not leak them.
    let _stop_background = background.clone().drop_guard();
    let replica = Replica::start(&settings, &keys, db, &background).await?;
    let tls_config = tls::server_config(
        keys.ca.cert_der(),
        keys.server_certificate.clone(),
        replica.revocations.clone(),
    )?;
    let ready = Arc::new(AtomicBool::new(false));
    let (health, grpc) = replica.grpc().await?;

    let (draining_tx, draining) = tokio::sync::watch::channel(false);
    let ops = http::router(http::OpsState {
        metrics: replica.metrics.clone(),
        db: replica.db.clone(),
        ca: keys.ca.clone(),
        revocations: replica.revocations.clone(),
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
    let incoming = tls::incoming(
        listeners.grpc,
        tls_config,
        replica.revocations.clone(),
        replica.metrics.clone(),
    );
    let signal = {
        let ready = ready.clone();
        async move {
            shutdown.await;
            tracing::info!("shutting down: refusing new connections and draining open streams");
            ready.store(false, Ordering::Release);
            report_health(&health, ServingStatus::NotServing).await;
            health.set_service_status("", ServingStatus::NotServing).await;
            let _ = draining_tx.send(true);
        }
    };
    let serve = grpc.serve_with_incoming_shutdown(incoming, signal);
    let grace = settings.shutdown_grace;
    let deadline = async move {
        let mut draining = draining;
        if draining.wait_for(|d| *d).await.is_err() {
            std::future::pending::<()>().await;
        }
        tokio::time::sleep(grace).await;
    };

    ready.store(true, Ordering::Release);
    tracing::info!(grpc = %grpc_addr, http = %http_addr, backend = ?replica.db.get_database_backend(), replica = %settings.replica_name, "medfleetd serving");
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
    replica.stop().await?;
    tracing::info!("medfleetd stopped");
    result
}

impl Replica {
    /// After the background tasks were cancelled: lets the relays hand their destination leases back before the
    /// pool closes, so another replica (or this one, restarted) relays at once instead of after the lease runs out.
    async fn stop(self) -> Result<(), ServeError> {
        if tokio::time::timeout(std::time::Duration::from_secs(5), self.relays)
            .await
            .is_err()
        {
            tracing::warn!("EMR relay leases not released within 5 s; they expire on their own");
        }
        if tokio::time::timeout(std::time::Duration::from_secs(5), self.scheduler)
            .await
            .is_err()
        {
            tracing::warn!("rollout scheduler lease not released within 5 s; it expires on its own");
        }
        self.metrics.shutdown();
        self.db.close().await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use prost::Message as _;

    use super::*;

    #[test]
    fn every_service_of_the_proto_reports_health() {
        let set = prost_types::FileDescriptorSet::decode(medfleet_proto::FILE_DESCRIPTOR_SET).expect("descriptor");
        let mut proto: Vec<String> = set
            .file
            .iter()
            .flat_map(|f| f.service.iter().map(move |s| format!("{}.{}", f.package(), s.name())))
            .collect();
        let mut served: Vec<String> = SERVICES.iter().map(|s| (*s).to_owned()).collect();
        proto.sort();
        served.sort();
        assert_eq!(served, proto);
    }
}
