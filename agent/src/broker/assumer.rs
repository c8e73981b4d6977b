//! The adapter between the cache's [`cache::AssumeRole`] (per consumer) and
//! the STS client's [`sts::AssumeRole`] (per request).
//!
//! The cache thinks in consumers; the STS client in requests. This module
//! turns a consumer into its request:
//!
//! - **Role:** the consumer's `role_arn`, else the instance role itself,
//!   `arn:{partition}:iam::{account}:role/{role}`: partition and account
//!   from `iam/info`'s `InstanceProfileArn` (an instance profile lives in the
//!   account and partition of its role), else the account from the
//!   credentials' `AccountId` with the partition of the region.
//! - **Session name:** `<consumer>@<instance-id>` ([`sts::session_name`]),
//!   so CloudTrail names both the app and the host.
//! - Its session policy, policy ARNs and duration; `SourceIdentity` (the
//!   consumer's name) and session tags ([`sts::consumer_tags`], with the
//!   consumer's first uid) only when the consumer asks for them, since the
//!   role's trust policy must then allow `sts:SetSourceIdentity` /
//!   `sts:TagSession`.
//!
//! The instance id, region and `iam/info` are read from IMDS at the first
//! `AssumeRole` and kept (they do not change for the life of an instance),
//! so a slow or absent IMDS never delays the agent's start: the first call
//! fails as a transient error and the cache backs off and asks again.
//!
//! STS errors map to the cache's kinds: throttling to
//! [`Throttled`](AssumeErrorKind::Throttled) (the longer backoff), other
//! transient ones, refused caller credentials (reloaded from IMDS) and
//! unexpected answers to [`Transient`](AssumeErrorKind::Transient),
//! `AccessDenied` to [`AccessDenied`](AssumeErrorKind::AccessDenied), and an
//! invalid request to [`Invalid`](AssumeErrorKind::Invalid).

use std::sync::Arc;

use imds_client::{ErrorKind, ImdsClient, RoleCredentials};
use tokio::sync::OnceCell;

use super::cache::{self, AssumeError, AssumeErrorKind};
use super::config::Consumer;
use super::sts::{self, AssumeRoleRequest, StsClient, StsClientBuilder, StsError, StsErrorKind};
use crate::container::InstanceProfile;

/// What the adapter learns from IMDS once.
#[derive(Debug)]
struct Instance<S> {
    sts: S,
    instance_id: String,
    region: String,
}

/// How the adapter makes its STS client once the region is known.
type MakeSts<S> = Box<dyn Fn(&str) -> Result<S, StsError> + Send + Sync>;

/// Assumes each consumer's role with an [`sts::AssumeRole`] client (the
/// [`StsClient`] in the agent), reading what it needs from IMDS once.
pub struct StsAssumer<S = StsClient> {
    imds: ImdsClient,
    make_sts: MakeSts<S>,
    instance: OnceCell<Arc<Instance<S>>>,
    profile: OnceCell<InstanceProfile>,
}

impl<S> std::fmt::Debug for StsAssumer<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StsAssumer")
            .field("imds", &self.imds.endpoint())
            .field(
                "instance_id",
                &self.instance.get().map(|i| i.instance_id.as_str()),
            )
            .finish_non_exhaustive()
    }
}

impl StsAssumer<StsClient> {
    /// An adapter over the agent's [`StsClient`], configured by
    /// `builder` and given the instance's region from IMDS (unless
    /// `AWS_REGION` or the builder names one).
    ///
    /// `builder` is checked now with a placeholder region, so a bad
    /// `AWS_ENDPOINT_URL_STS` stops the agent at start rather than at the
    /// first request.
    pub fn new(
        imds: ImdsClient,
        builder: impl Fn() -> StsClientBuilder + Send + Sync + 'static,
    ) -> Result<Self, StsError> {
        builder().instance_region("us-east-1").build()?;
        Ok(Self::with_client(imds, move |region| {
            builder().instance_region(region).build()
        }))
    }
}

impl<S: sts::AssumeRole + 'static> StsAssumer<S> {
    /// An adapter over the client `make_sts` builds for the instance's region.
    pub fn with_client(
        imds: ImdsClient,
        make_sts: impl Fn(&str) -> Result<S, StsError> + Send + Sync + 'static,
    ) -> Self {
        Self {
            imds,
            make_sts: Box::new(make_sts),
            instance: OnceCell::new(),
            profile: OnceCell::new(),
        }
    }

    async fn instance(&self) -> Result<&Arc<Instance<S>>, AssumeError> {
        self.instance
            .get_or_try_init(|| async {
                let unavailable = |what: &str, e: imds_client::Error| {
                    AssumeError::new(
                        AssumeErrorKind::Transient,
                        format!("reading the instance's {what} from IMDS failed: {e}"),
                    )
                };
                let instance_id = self
                    .imds
                    .instance_id()
                    .await
                    .map_err(|e| unavailable("id", e))?;
                let region = self
                    .imds
                    .region()
                    .await
                    .map_err(|e| unavailable("region", e))?;
                let sts = (self.make_sts)(&region).map_err(|e| map_error(&e))?;
                tracing::info!(
                    instance_id = %instance_id,
                    region = %region,
                    "STS client ready for the consumers' sessions"
                );
                Ok(Arc::new(Instance {
                    sts,
                    instance_id,
                    region,
                }))
            })
            .await
    }

    /// The instance role's own ARN: for consumers without a `role_arn`.
    async fn instance_role_arn(
        &self,
        with: &RoleCredentials,
        region: &str,
    ) -> Result<String, AssumeError> {
        if self.profile.get().is_none() {
            match self.imds.iam_info().await {
                Ok(document) => {
                    if let Some(profile) = InstanceProfile::from_iam_info(&document) {
                        let _ = self.profile.set(profile);
                    }
                }
                Err(e) if matches!(e.kind(), ErrorKind::NoRoleAttached) => {}
                Err(e) => tracing::debug!(cause = %e, "reading iam/info failed"),
            }
        }
        if let Some(profile) = self.profile.get() {
            return Ok(profile.role_arn(&with.role));
        }
        match with.credentials.account_id() {
            Some(account) => Ok(format!(
                "arn:{}:iam::{account}:role/{}",
                partition_of(region),
                with.role
            )),
            None => Err(AssumeError::new(
                AssumeErrorKind::Transient,
                "the instance role's ARN is not known yet: iam/info gave no InstanceProfileArn \
                 and the credentials no AccountId. Hint: give the consumer a role_arn",
            )),
        }
    }

    /// The request for `consumer` (exposed for tests and `doctor`).
    pub async fn request(
        &self,
        consumer: &Consumer,
        with: &RoleCredentials,
    ) -> Result<AssumeRoleRequest, AssumeError> {
        let instance = self.instance().await?;
        let role_arn = match &consumer.role_arn {
            Some(arn) => arn.clone(),
            None => self.instance_role_arn(with, &instance.region).await?,
        };
        let mut request = AssumeRoleRequest::new(
            role_arn,
            sts::session_name(&consumer.name, &instance.instance_id),
        )
        .duration(consumer.duration)
        .policy_arns(consumer.policy_arns.clone());
        if let Some(policy) = &consumer.session_policy {
            request = request.policy(policy.clone());
        }
        if consumer.source_identity {
            request = request.source_identity(consumer.name.clone());
        }
        if consumer.session_tags {
            request = request.tags(sts::consumer_tags(
                &consumer.name,
                consumer.uids.first().copied(),
            ));
        }
        Ok(request)
    }
}

impl<S: sts::AssumeRole + 'static> cache::AssumeRole for StsAssumer<S> {
    async fn assume(
        &self,
        consumer: &Consumer,
        with: &RoleCredentials,
    ) -> Result<RoleCredentials, AssumeError> {
        let request = self.request(consumer, with).await?;
        let instance = self.instance().await?;
        let assumed = instance
            .sts
            .assume_role(&request, with)
            .await
            .map_err(|e| map_error(&e))?;
        Ok(RoleCredentials {
            role: request.role_arn,
            credentials: Arc::new(assumed.credentials),
        })
    }
}

/// The cache's kind for an STS failure (module docs).
pub fn map_error(error: &StsError) -> AssumeError {
    let throttled = matches!(
        error.code(),
        Some(
            "Throttling"
                | "ThrottlingException"
                | "RequestLimitExceeded"
                | "TooManyRequestsException"
        )
    ) || error.status() == Some(429);
    let kind = match error.kind() {
        StsErrorKind::Transient if throttled => AssumeErrorKind::Throttled,
        StsErrorKind::AccessDenied => AssumeErrorKind::AccessDenied,
        StsErrorKind::InvalidConfiguration => AssumeErrorKind::Invalid,
        _ => AssumeErrorKind::Transient,
    };
    AssumeError::new(kind, error.to_string())
}

/// The ARN partition of `region`.
fn partition_of(region: &str) -> &'static str {
    if region.starts_with("cn-") {
        "aws-cn"
    } else if region.starts_with("us-gov-") {
        "aws-us-gov"
    } else {
        "aws"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::cache::AssumeRole as _;
    use imds_client::config::Env;
    use imds_client::mock::{FaultDuration, MockImds, MockSts, StsFault};
    use std::time::Duration;

    fn consumer(name: &str) -> Consumer {
        Consumer {
            name: name.into(),
            uids: vec![1001],
            gids: vec![],
            role_arn: None,
            session_policy: Some(r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"s3:GetObject","Resource":"*"}]}"#.into()),
            policy_arns: vec!["arn:aws:iam::aws:policy/ReadOnlyAccess".into()],
            duration: Duration::from_secs(900),
            credentials_file: None,
            json_file: None,
            container_token_file: None,
            source_identity: false,
            session_tags: false,
        }
    }

    async fn setup() -> (MockImds, MockSts, StsAssumer, RoleCredentials) {
        let imds = MockImds::builder().role("web-role").start().await.unwrap();
        let sts = MockSts::for_imds(&imds).start().await.unwrap();
        let endpoint = sts.endpoint();
        let client = ImdsClient::builder()
            .endpoint(imds.endpoint())
            .unwrap()
            .build()
            .unwrap();
        let assumer = StsAssumer::new(client, move || {
            StsClient::builder().env(Env::from_pairs([(
                "AWS_ENDPOINT_URL_STS",
                endpoint.clone(),
            )]))
        })
        .unwrap();
        let with = RoleCredentials {
            role: "web-role".into(),
            credentials: Arc::new(imds.current_credentials().unwrap()),
        };
        (imds, sts, assumer, with)
    }

    #[tokio::test]
    async fn a_consumer_is_assumed_as_its_own_request_on_the_instance_role() {
        let (_imds, sts, assumer, with) = setup().await;
        let got = assumer.assume(&consumer("billing"), &with).await.unwrap();
        let calls = sts.assume_role_calls();
        assert_eq!(calls.len(), 1, "one AssumeRole, saw {calls:?}");
        let call = &calls[0];
        let role = call.role_arn.clone().unwrap();
        assert!(
            role.starts_with("arn:aws:iam::") && role.ends_with(":role/web-role"),
            "the instance role's own ARN by default, saw {role}"
        );
        assert_eq!(got.role, role, "the session names the role assumed");
        let session = call.role_session_name.clone().unwrap();
        assert!(session.starts_with("billing@i-"), "session name {session}");
        assert_eq!(call.duration_seconds.as_deref(), Some("900"));
        assert!(call.policy.as_deref().unwrap().contains("s3:GetObject"));
        assert_eq!(call.policy_arns, consumer("billing").policy_arns);
        assert!(call.tags.is_empty() && call.source_identity.is_none());
        assert_ne!(
            got.credentials.access_key_id(),
            with.credentials.access_key_id(),
            "a session of its own"
        );

        let mut tagged = consumer("shipper");
        tagged.source_identity = true;
        tagged.session_tags = true;
        assumer.assume(&tagged, &with).await.unwrap();
        let call = sts.assume_role_calls().pop().unwrap();
        assert_eq!(call.source_identity.as_deref(), Some("shipper"));
        assert_eq!(
            call.tags,
            vec![
                ("imds-agent:consumer".to_owned(), "shipper".to_owned()),
                ("imds-agent:uid".to_owned(), "1001".to_owned())
            ]
        );
    }

    #[tokio::test]
    async fn sts_errors_map_to_the_caches_kinds() {
        let (_imds, sts, assumer, with) = setup().await;
        sts.inject(StsFault::Throttling, FaultDuration::Requests(1));
        let e = assumer.assume(&consumer("a"), &with).await.unwrap_err();
        assert_eq!(e.kind(), AssumeErrorKind::Throttled, "{e}");
        sts.inject(
            StsFault::ServerError { status: 503 },
            FaultDuration::Requests(1),
        );
        let e = assumer.assume(&consumer("a"), &with).await.unwrap_err();
        assert_eq!(e.kind(), AssumeErrorKind::Transient, "{e}");
        let mut denied = consumer("b");
        denied.role_arn = Some("arn:aws:iam::123456789012:role/nope".into());
        sts.deny_assume_role("arn:aws:iam::123456789012:role/nope");
        let e = assumer.assume(&denied, &with).await.unwrap_err();
        assert_eq!(e.kind(), AssumeErrorKind::AccessDenied, "{e}");
        let mut long = consumer("c");
        long.duration = Duration::from_secs(7200);
        let e = assumer.assume(&long, &with).await.unwrap_err();
        assert_eq!(e.kind(), AssumeErrorKind::Invalid, "{e}");
    }
}
