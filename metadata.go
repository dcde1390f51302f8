package tailrace

// Metadata keys that tailrace sets on every staged message. They travel in
// Watermill message metadata from the outbox through the relay to the broker
// (as headers or attributes) and to consumers, and the routing policy matches
// on them. They are part of the wire format: they never change once released.
//
// User headers may use any other key; these names are reserved.
const (
	// MetaKind is the stable kind of the message (a command or event name),
	// from its Kind() method or its registered name. Policy attribute: Event.
	MetaKind = "kind"
	// MetaDomain is the optional business domain. Policy attribute: Domain.
	MetaDomain = "domain"
	// MetaTenant is the optional tenant id.
	MetaTenant = "tenant"
	// MetaTenantTier is the optional tenant tier. Policy attribute: TenantTier.
	MetaTenantTier = "tenant_tier"
	// MetaPartitionKey orders messages: the relay delivers messages with the
	// same partition key in commit order. Usually an aggregate id.
	MetaPartitionKey = "partition_key"
	// MetaCorrelationID ties together every message caused by one request.
	// It is the key Watermill's CorrelationID middleware uses.
	MetaCorrelationID = "correlation_id"
	// MetaCausationID is the id of the message that caused this one.
	MetaCausationID = "causation_id"
	// MetaOccurredAt is the staging time, RFC 3339 with nanoseconds, UTC.
	MetaOccurredAt = "occurred_at"
	// MetaTraceparent is the W3C traceparent of the staging span.
	MetaTraceparent = "traceparent"
	// MetaCommand marks a message staged by outbox Enqueue: a command for a
	// worker to execute, not an event. Its value is "true". Policies route on
	// it like any other attribute.
	MetaCommand = "tailrace_command"
	// MetaPolicyVersion is the content hash of the routing policy that routed
	// the message (stamped by the routing publisher).
	MetaPolicyVersion = "tailrace_policy_version"
	// MetaPolicyRule is the name (or index) of the policy rule that routed the
	// message (stamped by the routing publisher).
	MetaPolicyRule = "tailrace_policy_rule"
)
