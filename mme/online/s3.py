"""Object storage: reading s3:// shards as they stream in, through boto3.

S3: s3://bucket/key URLs are read with boto3, which takes the endpoint and credentials from the
standard AWS variables itself (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_DEFAULT_REGION, ...; AWS_ENDPOINT_URL needs boto3 >= 1.28.57, checked with 1.43). The object body is streamed into
the tar reader (no temporary files). The scheme is registered in webdataset's gopen table, so
webdataset's own pipelines can read s3:// too. Object stores drop connections and have outages: a read
that fails is retried with backoff and a dropped object stream resumes at its byte offset (Range), for
up to MME_S3_PATIENCE seconds (default 300) without progress; then, or when the endpoint refuses the
credentials, S3Error stops the run in one line (bucket, what the endpoint said, which variables to check).

    f = S3Object("s3://bucket/shards/train-000-000000.tar")   # a raw stream, resumed after dropped connections
    urls = s3_list("s3://bucket/shards/")                      # the *.tar objects directly under a prefix

Importing this module registers the s3 scheme in webdataset's gopen table (gopen_s3).
"""
import io
import os
import time

from webdataset.gopen import gopen_schemes  # opens local paths and URLs by scheme


def one_line(e):
    """An exception as one line: 'Type: message'."""
    return f"{type(e).__name__}: {' '.join(str(e).split())}"


def s3_split(url):
    """'s3://bucket/a/b.tar' -> ('bucket', 'a/b.tar')"""
    bucket, _, key = url[len("s3://"):].partition("/")
    return bucket, key


def s3_client():
    # boto3 reads endpoint, region and credentials from the environment itself. A new client per shard
    # (~5 ms, nothing next to a shard's bytes) is never shared across a DataLoader fork. botocore's
    # "standard" retry mode retries each request a few times with backoff; _retrying adds the patience.
    import boto3  # here: local-only training never imports boto3
    from botocore.config import Config
    return boto3.client("s3", config=Config(retries={"mode": "standard", "max_attempts": 3}, connect_timeout=10,
                                            read_timeout=60))


class S3Error(ValueError):
    """S3 said no for good (credentials, permissions) or stayed unreachable past the patience; one line,
    never credentials. Not a damaged shard: every shard would fail alike, so the run stops."""


def s3_patience():
    """Seconds an S3 read keeps retrying without progress before it gives up (MME_S3_PATIENCE, default 300)."""
    return float(os.environ.get("MME_S3_PATIENCE", 300))


AUTH = ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "ExpiredToken", "InvalidToken", "TokenRefreshRequired",
        "AuthorizationHeaderMalformed", "InvalidClientTokenId", "AllAccessDisabled", "AccountProblem", "403", "401")


def _retrying(url, fn):
    """fn() (an S3 request), retried with exponential backoff (0.5 s doubling to 30 s) while the failure
    may pass (connection refused or dropped, timeouts, 5xx, throttling), for up to s3_patience() seconds.
    A missing object raises FileNotFoundError (like a local file); refused credentials raise S3Error."""
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        ConnectionError,
        HTTPClientError,
        IncompleteReadError,
        ResponseStreamingError,
    )
    from urllib3.exceptions import HTTPError
    bucket = s3_split(url)[0]
    start, delay = time.monotonic(), 0.5
    while True:
        try:
            return fn()
        except ClientError as e:
            err, status = e.response.get("Error", {}), e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            code = str(err.get("Code", status))
            if code in ("NoSuchKey", "404", "NoSuchBucket"):
                raise FileNotFoundError(f"no such S3 object: {url}") from None
            if code in ("PreconditionFailed", "412"):     # a resumed read: the object was replaced meanwhile
                raise ValueError("the S3 object changed while it was read") from None
            said = f"{code}: {' '.join(str(err.get('Message', '')).split())[:200]}"
            if code in AUTH or status in (401, 403):
                raise S3Error(f"{url}: the S3 endpoint refused access to bucket {bucket!r} ({said}); check "
                              "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_PROFILE and "
                              "AWS_ENDPOINT_URL") from None
            if status and status < 500 and code not in ("SlowDown", "RequestTimeout", "Throttling", "429"):
                raise S3Error(f"{url}: the S3 endpoint said {said}") from None
            failure = said
        except (ConnectionError, HTTPClientError, IncompleteReadError, ResponseStreamingError, HTTPError, OSError) as e:
            failure = one_line(e)
        except BotoCoreError as e:                       # no credentials, no region, a bad endpoint URL
            raise S3Error(f"{url}: {one_line(e)}; check the AWS_* variables (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, "
                          "AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION)") from None
        waited = time.monotonic() - start
        if waited + delay > s3_patience():
            raise S3Error(f"{url}: S3 unreachable for {waited:.0f} s ({failure}); giving up "
                          f"(MME_S3_PATIENCE={s3_patience():g} s sets how long to wait)")
        time.sleep(delay)
        delay = min(2 * delay, 30.0)


class S3Object(io.RawIOBase):
    """One S3 object as a stream read as it arrives. A connection dropped mid-object (or an outage) is
    resumed from the byte offset reached with a Range request, pinned to the object's ETag, retried as
    _retrying says: a shard is read whole or the run is told in one line why not."""

    def __init__(self, url):
        super().__init__()
        self.url, (self.bucket, self.key) = url, s3_split(url)
        self.client, self.pos, self.etag = s3_client(), 0, None
        self.body = self._get()

    def _get(self):
        return _retrying(self.url, self._request)

    def _request(self):
        extra = {"Range": f"bytes={self.pos}-", "IfMatch": self.etag} if self.pos else {}
        response = self.client.get_object(Bucket=self.bucket, Key=self.key, **extra)
        self.etag = self.etag or response.get("ETag")
        return response["Body"]

    def readable(self):
        return True

    def readinto(self, buf):
        def read():
            try:
                return self.body.read(len(buf))
            except Exception:
                self.body.close()
                self.body = None                         # the next try asks again from self.pos
                raise

        def resumed():
            if self.body is None:
                self.body = self._request()
            return read()
        data = _retrying(self.url, resumed)
        buf[:len(data)] = data
        self.pos += len(data)
        return len(data)

    def close(self):
        if self.body is not None:
            self.body.close()
        super().close()


def gopen_s3(url, mode="rb", bufsize=8192, **kw):
    """Open s3://bucket/key for streaming reads (webdataset gopen handler)."""
    assert mode == "rb", f"{url}: s3 is read-only here"
    return S3Object(url)


def s3_list(url):
    """The *.tar objects directly under the prefix s3://bucket/prefix/ (like *.tar in a directory)."""
    bucket, prefix = s3_split(url)

    def listing():
        pages = s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix, Delimiter="/")
        return [f"s3://{bucket}/{o['Key']}" for page in pages for o in page.get("Contents", []) if o["Key"].endswith(".tar")]
    try:
        return _retrying(url, listing)
    except FileNotFoundError:
        return []                                        # no such bucket: nothing matches


gopen_schemes["s3"] = gopen_s3                          # so gopen (ours and webdataset's pipelines) reads s3://

