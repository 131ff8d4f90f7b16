//! The validating admission webhook every controller replica serves: what an
//! agent would reject is refused at `kubectl apply`, with the same field-path
//! message, and what is accepted with a change (host bits masked) comes back
//! with a warning.
//!
//! Its certificate is made by the first replica that finds none and kept in
//! a Secret, so every replica serves the same one; each replica writes the
//! Secret's CA into the ValidatingWebhookConfiguration's `caBundle`. No
//! cert-manager needed; rotating is deleting the Secret and restarting.

use std::{net::SocketAddr, sync::Arc};

use anyhow::{Context as _, Result};
use bulkhead_policy::{manifest, rules, Object};
use http_body_util::{BodyExt, Full};
use hyper::{body::Bytes, server::conn::http1, service::service_fn, Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use k8s_openapi::{
    api::{admissionregistration::v1::ValidatingWebhookConfiguration, core::v1::Secret},
    ByteString,
};
use kube::{
    api::{ObjectMeta, PostParams},
    core::{
        admission::{AdmissionRequest, AdmissionResponse, AdmissionReview},
        DynamicObject,
    },
    Api, Client,
};
use tokio::net::TcpListener;
use tokio_rustls::{
    rustls::{
        self,
        pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer},
    },
    TlsAcceptor,
};

/// Where and as whom the webhook serves.
#[derive(Clone, Debug)]
pub struct WebhookConfig {
    pub address: SocketAddr,
    /// The Secret (in the controller's namespace) holding CA, certificate and key.
    pub secret: String,
    /// The ValidatingWebhookConfiguration whose `caBundle` is set.
    pub configuration: String,
    /// The names (and addresses) the certificate is for.
    pub hosts: Vec<String>,
}

/// The certificate the replicas share.
struct Certificate {
    ca: Vec<u8>,
    certificate: Vec<u8>,
    key: Vec<u8>,
}

/// Take (or make) the certificate, publish its CA, and serve on
/// `config.address`; returns the address served.
pub async fn start(client: Client, namespace: &str, config: &WebhookConfig) -> Result<SocketAddr> {
    let certificate = certificate(&client, namespace, config).await?;
    inject_ca(&client, &config.configuration, &certificate.ca).await?;
    let acceptor = TlsAcceptor::from(Arc::new(tls_config(&certificate)?));
    let listener = TcpListener::bind(config.address)
        .await
        .with_context(|| format!("binding the webhook on {}", config.address))?;
    let address = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(stream) = acceptor.accept(stream).await else { return };
                let service = service_fn(|request: Request<hyper::body::Incoming>| async move {
                    Ok::<_, std::convert::Infallible>(handle(request).await)
                });
                let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
            });
        }
    });
    Ok(address)
}

async fn handle(request: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, body: Vec<u8>| {
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        response.headers_mut().insert(hyper::header::CONTENT_TYPE, "application/json".parse().expect("a header value"));
        response
    };
    if request.method() != Method::POST || request.uri().path() != "/validate" {
        return reply(StatusCode::NOT_FOUND, b"{}".to_vec());
    }
    let body = match request.into_body().collect().await {
        Ok(body) => body.to_bytes(),
        Err(_) => return reply(StatusCode::BAD_REQUEST, b"{}".to_vec()),
    };
    let review = review(&body);
    reply(StatusCode::OK, serde_json::to_vec(&review).expect("a review serializes"))
}

/// The answer to one AdmissionReview.
pub fn review(body: &[u8]) -> AdmissionReview<DynamicObject> {
    let request: AdmissionRequest<DynamicObject> =
        match serde_json::from_slice::<AdmissionReview<DynamicObject>>(body).map(TryInto::try_into) {
            Ok(Ok(request)) => request,
            Ok(Err(error)) => return AdmissionResponse::invalid(error).into_review(),
            Err(error) => return AdmissionResponse::invalid(error).into_review(),
        };
    let mut response = AdmissionResponse::from(&request);
    let Some(object) = &request.object else { return response.into_review() };
    let mut value = serde_json::to_value(object).expect("an object serializes");
    // The review's object carries its kind in the request, not always in itself.
    value["kind"] = request.kind.kind.clone().into();
    match judge(value) {
        Ok(warnings) if warnings.is_empty() => {}
        Ok(warnings) => response.warnings = Some(warnings),
        Err(denial) => response = response.deny(denial),
    }
    response.into_review()
}

/// What an agent would say of one object: the warnings it is accepted
/// with, or why it is rejected (the agents' and the status's words).
pub fn judge(value: serde_json::Value) -> Result<Vec<String>, String> {
    match manifest::object("admission", 1, value) {
        Err(error) => Err(error.message),
        Ok(Some(Object::Policy(policy))) => match rules::normalize(&policy) {
            Ok(policy) => Ok(policy.warnings.iter().map(|w| format!("{}: {}", w.reason, w)).collect()),
            Err(error) => Err(format!("{}: {}", error.reason, error)),
        },
        Ok(_) => Ok(Vec::new()),
    }
}

/// The Secret's certificate, or a new one stored there (the first replica
/// to create it wins; the others read it).
async fn certificate(client: &Client, namespace: &str, config: &WebhookConfig) -> Result<Certificate> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let from_secret = |secret: &Secret| -> Option<Certificate> {
        let data = secret.data.as_ref()?;
        let field = |name: &str| data.get(name).map(|b| b.0.clone());
        Some(Certificate { ca: field("ca.crt")?, certificate: field("tls.crt")?, key: field("tls.key")? })
    };
    let existing =
        secrets.get_opt(&config.secret).await.with_context(|| format!("reading Secret {}", config.secret))?;
    if let Some(certificate) = existing.as_ref().and_then(from_secret) {
        return Ok(certificate);
    }
    let made = make_certificate(&config.hosts)?;
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(config.secret.clone()),
            namespace: Some(namespace.to_string()),
            labels: Some([("app.kubernetes.io/name".to_string(), "bulkhead".to_string())].into()),
            ..Default::default()
        },
        type_: Some("kubernetes.io/tls".into()),
        data: Some(
            [
                ("ca.crt".to_string(), ByteString(made.ca.clone())),
                ("tls.crt".to_string(), ByteString(made.certificate.clone())),
                ("tls.key".to_string(), ByteString(made.key.clone())),
            ]
            .into(),
        ),
        ..Default::default()
    };
    match secrets.create(&PostParams::default(), &secret).await {
        Ok(_) => {
            tracing::info!(secret = %config.secret, hosts = ?config.hosts, "made the webhook's certificate");
            Ok(made)
        }
        // Another replica made it first: serve theirs.
        Err(kube::Error::Api(status)) if status.code == 409 => {
            let secret = secrets.get(&config.secret).await?;
            from_secret(&secret).context("the webhook Secret lacks ca.crt, tls.crt or tls.key")
        }
        Err(error) => Err(error).with_context(|| format!("creating Secret {}", config.secret)),
    }
}

/// A CA and a serving certificate signed by it, for `hosts`.
fn make_certificate(hosts: &[String]) -> Result<Certificate> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "bulkhead webhook CA");
    let ca_key = KeyPair::generate()?;
    let ca_certificate = ca.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca, ca_key);
    let mut serving = CertificateParams::new(hosts.to_vec())?;
    serving.distinguished_name.push(DnType::CommonName, hosts.first().map_or("bulkhead-webhook", String::as_str));
    let key = KeyPair::generate()?;
    let certificate = serving.signed_by(&key, &issuer)?;
    Ok(Certificate {
        ca: ca_certificate.pem().into_bytes(),
        certificate: certificate.pem().into_bytes(),
        key: key.serialize_pem().into_bytes(),
    })
}

fn tls_config(certificate: &Certificate) -> Result<rustls::ServerConfig> {
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(&certificate.certificate).collect::<Result<_, _>>()?;
    let key = PrivateKeyDer::from_pem_slice(&certificate.key)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?)
}

/// Set every webhook's `caBundle` of the configuration to our CA; a
/// configuration not installed is logged, not fatal (the webhook is then
/// simply not called).
async fn inject_ca(client: &Client, name: &str, ca: &[u8]) -> Result<()> {
    let api: Api<ValidatingWebhookConfiguration> = Api::all(client.clone());
    let Some(mut configuration) =
        api.get_opt(name).await.with_context(|| format!("reading ValidatingWebhookConfiguration {name}"))?
    else {
        tracing::warn!(
            configuration = name,
            "no ValidatingWebhookConfiguration of that name: the webhook serves, but nothing calls it"
        );
        return Ok(());
    };
    let mut changed = false;
    for webhook in configuration.webhooks.iter_mut().flatten() {
        if webhook.client_config.ca_bundle.as_ref().map(|b| b.0.as_slice()) != Some(ca) {
            webhook.client_config.ca_bundle = Some(ByteString(ca.to_vec()));
            changed = true;
        }
    }
    if changed {
        api.replace(name, &PostParams::default(), &configuration)
            .await
            .with_context(|| format!("writing the caBundle of ValidatingWebhookConfiguration {name}"))?;
        tracing::info!(configuration = name, "caBundle set");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn review_of(object: serde_json::Value) -> serde_json::Value {
        let kind = object["kind"].clone();
        let body = serde_json::json!({
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {
                "uid": "u-1", "operation": "CREATE", "name": "p", "namespace": "shop",
                "kind": {"group": "bulkhead.io", "version": "v1alpha1", "kind": kind},
                "resource": {"group": "bulkhead.io", "version": "v1alpha1", "resource": "connectionpolicies"},
                "userInfo": {"username": "alice"}, "object": object, "dryRun": false
            }
        });
        serde_json::to_value(review(&serde_json::to_vec(&body).unwrap())).unwrap()
    }

    fn policy(spec: serde_json::Value) -> serde_json::Value {
        serde_json::json!({"apiVersion": "bulkhead.io/v1alpha1", "kind": "ConnectionPolicy",
            "metadata": {"name": "p", "namespace": "shop"}, "spec": spec})
    }

    #[test]
    fn a_bad_policy_is_refused_with_its_field_path_and_a_good_one_allowed() {
        let bad = review_of(policy(
            serde_json::json!({"podSelector": {"matchExpressions": [{"key": "app", "operator": "Near", "values": ["x"]}]}}),
        ));
        let response = &bad["response"];
        assert_eq!((response["uid"].as_str(), response["allowed"].as_bool()), (Some("u-1"), Some(false)));
        let message = response["status"]["message"].as_str().unwrap();
        assert!(message.contains("spec.podSelector.matchExpressions[0].operator"), "{message}");
        assert!(message.contains("InvalidSelector"), "{message}");

        let good = review_of(policy(
            serde_json::json!({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.1.2.3/16"}}]}]}),
        ));
        assert_eq!(good["response"]["allowed"], true, "{good}");
        let warnings = good["response"]["warnings"].to_string();
        assert!(warnings.contains("HostBitsMasked") && warnings.contains("10.1.0.0/16"), "{warnings}");
    }

    #[test]
    fn a_certificate_for_the_service_names_is_made_and_loads() {
        let made = make_certificate(&["bulkhead-controller.bulkhead-system.svc".into(), "127.0.0.1".into()]).unwrap();
        assert!(String::from_utf8_lossy(&made.ca).starts_with("-----BEGIN CERTIFICATE-----"));
        tls_config(&made).unwrap();
    }
}
