//! Creating the backend's bucket and table with exactly the schema
//! `template.yaml` declares (key, stream, TTL); running it twice is harmless.

use super::*;

impl DynamoIndex {
    /// Creates the table (key schema, stream, TTL) when it does not exist.
    pub async fn create_table(&self) -> Result<bool> {
        let attr = |name: &str| {
            AttributeDefinition::builder()
                .attribute_name(name)
                .attribute_type(ScalarAttributeType::S)
                .build()
                .expect("complete attribute definition")
        };
        let key =
            |name: &str, t: KeyType| KeySchemaElement::builder().attribute_name(name).key_type(t).build().expect("complete key element");
        let created = self
            .client
            .create_table()
            .table_name(&self.table)
            .attribute_definitions(attr("pk"))
            .attribute_definitions(attr("sk"))
            .key_schema(key("pk", KeyType::Hash))
            .key_schema(key("sk", KeyType::Range))
            .billing_mode(BillingMode::PayPerRequest)
            .stream_specification(
                StreamSpecification::builder()
                    .stream_enabled(true)
                    .stream_view_type(StreamViewType::NewImage)
                    .build()
                    .expect("complete stream spec"),
            )
            .send()
            .await;
        let created = match created {
            Ok(_) => true,
            Err(e) if e.as_service_error().is_some_and(|s| s.is_resource_in_use_exception()) => false,
            Err(e) => return Err(unavailable("DynamoDB CreateTable", e)),
        };
        Ok(created)
    }
}

/// Creates the bucket when it does not exist. True when it was created.
pub async fn create_bucket(client: &aws_sdk_s3::Client, bucket: &str, region: Option<&str>) -> Result<bool> {
    let mut req = client.create_bucket().bucket(bucket);
    if let Some(region) = region.filter(|r| *r != "us-east-1") {
        req = req.create_bucket_configuration(
            aws_sdk_s3::types::CreateBucketConfiguration::builder()
                .location_constraint(aws_sdk_s3::types::BucketLocationConstraint::from(region))
                .build(),
        );
    }
    match req.send().await {
        Ok(_) => Ok(true),
        Err(e) if e.as_service_error().is_some_and(|s| s.is_bucket_already_owned_by_you() || s.is_bucket_already_exists()) => Ok(false),
        Err(e) => Err(unavailable("S3 CreateBucket", e)),
    }
}

/// `hubcap aws-setup`: creates the bucket and the table (stream, TTL) with
/// the schema `template.yaml` declares. Running it twice is harmless.
pub async fn setup(cfg: &AwsStorage) -> Result<(bool, bool)> {
    let sdk = sdk_config(cfg).await;
    let region = sdk.region().map(|r| r.to_string());
    let (s3, ddb) = clients(&sdk, SdkRole::Batch);
    let bucket = create_bucket(&s3, &cfg.bucket, region.as_deref()).await?;
    let index = DynamoIndex::new(ddb, &cfg.table, S3BlobStore::new(s3, &cfg.bucket, cfg.encryption.clone()));
    let table = index.create_table().await?;
    Ok((bucket, table))
}
