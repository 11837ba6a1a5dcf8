//! gRPC handlers of `EnrollmentService` and `CredentialService`.

use medfleet_core::identity::Identity;
use medfleet_core::validation::Violations;
use medfleet_proto::convert;
use medfleet_proto::v1::{
    self, credential_service_server::CredentialService, enrollment_service_server::EnrollmentService,
};
use tonic::{Request, Response, Status};
use tracing::instrument;

use crate::error::Error;
use crate::identity::credentials::Credentials;
use crate::identity::pki::{CsrError, IssuedCertificate, RequestedKey, check_csr};
use crate::transport::rpc::caller;
use crate::transport::tls::PeerInfo;

fn csr(field: &str, der: &[u8]) -> Result<RequestedKey, Error> {
    if der.is_empty() {
        return Err(Violations::single(field, "is required: a DER PKCS#10 CSR for the key you generated").into());
    }
    check_csr(der).map_err(|e| {
        let hint = match e {
            CsrError::Malformed | CsrError::BadSignature => e.to_string(),
            CsrError::UnsupportedKey(m) => m,
        };
        Violations::single(field, hint).into()
    })
}

fn response(identity: &Identity, issued: IssuedCertificate) -> v1::CertificateResponse {
    v1::CertificateResponse {
        identity: identity.to_string(),
        certificate_chain_pem: format!("{}{}", issued.cert_pem, issued.ca_pem),
        ca_certificate_pem: issued.ca_pem,
        not_after: Some(convert::timestamp(issued.not_after.into())),
        serial: issued.serial,
    }
}

#[derive(Debug, Clone)]
pub struct IdentityApi {
    credentials: Credentials,
}

impl IdentityApi {
    pub fn new(credentials: Credentials) -> Self {
        Self { credentials }
    }
}

#[tonic::async_trait]
impl EnrollmentService for IdentityApi {
    #[instrument(skip_all)]
    async fn enroll(&self, request: Request<v1::EnrollRequest>) -> Result<Response<v1::CertificateResponse>, Status> {
        let source = request
            .extensions()
            .get::<PeerInfo>()
            .map_or_else(|| std::net::IpAddr::from([0, 0, 0, 0]), |p| p.remote_addr.ip());
        let r = request.get_ref();
        let expected = if r.expected_device_id.is_empty() {
            None
        } else {
            Some(convert::device_id("expected_device_id", &r.expected_device_id).map_err(Error::from)?)
        };
        let key = csr("csr_der", &r.csr_der)?;
        match self
            .credentials
            .enroll(
                source,
                &r.token,
                &key,
                expected,
                &crate::transport::rpc::audit_context(&request),
            )
            .await
        {
            Ok((identity, issued)) => {
                tracing::info!(identity = %identity, serial = %issued.serial, "device enrolled");
                Ok(Response::new(response(&identity, issued)))
            }
            Err(error) => {
                // The token itself is a secret: never log it, only the outcome and the source.
                tracing::info!(source = %source, reason = %error, "enrollment refused");
                Err(error.into())
            }
        }
    }
}

#[tonic::async_trait]
impl CredentialService for IdentityApi {
    #[instrument(skip_all)]
    async fn renew(&self, request: Request<v1::RenewRequest>) -> Result<Response<v1::CertificateResponse>, Status> {
        let caller = caller(&request)?;
        // The connection is cut at notAfter, but a call already on its way must not slip through either: renewal
        // proves possession of a *valid* credential.
        if caller
            .certificate
            .as_ref()
            .is_some_and(|(_, not_after)| *not_after <= std::time::SystemTime::now())
        {
            return Err(Status::unauthenticated(
                "the certificate used for this call has expired; an expired certificate cannot be renewed: \
                 enroll again with a new token (devices) or ask an administrator for new credentials",
            ));
        }
        let key = csr("csr_der", &request.get_ref().csr_der)?;
        let current = caller.certificate.as_ref().map(|(serial, _)| serial.as_str());
        let issued = self
            .credentials
            .renew(
                &caller.identity,
                current,
                &key,
                &crate::transport::rpc::audit_context(&request),
            )
            .await?;
        tracing::info!(identity = %caller.identity, serial = %issued.serial, "certificate renewed");
        Ok(Response::new(response(&caller.identity, issued)))
    }

    #[instrument(skip_all)]
    async fn issue_credentials(
        &self,
        request: Request<v1::IssueCredentialsRequest>,
    ) -> Result<Response<v1::CertificateResponse>, Status> {
        let caller = caller(&request)?;
        let r = request.get_ref();
        let identity = convert::principal(r.kind, &r.name).map_err(Error::from)?;
        let lifetime = match &r.lifetime {
            None => None,
            Some(d) => Some(
                convert::duration(
                    "lifetime",
                    Some(d),
                    std::time::Duration::ZERO,
                    std::time::Duration::from_mins(5),
                    std::time::Duration::from_hours(397 * 24),
                )
                .map_err(Error::from)?,
            ),
        };
        let key = csr("csr_der", &r.csr_der)?;
        let issued = self
            .credentials
            .issue_credentials(
                &identity,
                &key,
                lifetime,
                &caller.identity,
                &crate::transport::rpc::audit_context(&request),
            )
            .await?;
        tracing::info!(identity = %identity, serial = %issued.serial, by = %caller.identity, "credentials issued");
        Ok(Response::new(response(&identity, issued)))
    }

    #[instrument(skip_all)]
    async fn revoke_credentials(
        &self,
        request: Request<v1::RevokeCredentialsRequest>,
    ) -> Result<Response<v1::RevokeResponse>, Status> {
        let caller = caller(&request)?;
        let r = request.get_ref();
        let identity = convert::principal(r.kind, &r.name).map_err(Error::from)?;
        let reason = convert::revocation_reason_from_wire(r.reason).map_err(Error::from)?;
        let revoked = self
            .credentials
            .revoke_principal(
                &identity,
                reason,
                &caller.identity,
                &crate::transport::rpc::audit_context(&request),
            )
            .await?;
        tracing::info!(identity = %identity, revoked, reason = reason.as_str(), by = %caller.identity, "credentials revoked");
        Ok(Response::new(v1::RevokeResponse {
            revoked_certificates: revoked,
        }))
    }
}
