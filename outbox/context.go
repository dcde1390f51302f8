package outbox

import "context"

type (
	correlationKey struct{}
	causationKey   struct{}
	tenantKey      struct{}
)

type tenantInfo struct{ tenant, tier string }

// WithCorrelationID returns a copy of ctx carrying the correlation id that
// Stage writes into every message staged under it (tailrace.MetaCorrelationID).
// A consumer handling a message typically continues its correlation id.
func WithCorrelationID(ctx context.Context, id string) context.Context {
	return context.WithValue(ctx, correlationKey{}, id)
}

// CorrelationIDFromContext returns the id set with WithCorrelationID, or "".
func CorrelationIDFromContext(ctx context.Context) string {
	s, _ := ctx.Value(correlationKey{}).(string)
	return s
}

// WithCausationID returns a copy of ctx carrying the causation id that Stage
// writes into every message staged under it (tailrace.MetaCausationID): the
// id of the message being handled, which caused the new ones.
func WithCausationID(ctx context.Context, id string) context.Context {
	return context.WithValue(ctx, causationKey{}, id)
}

// CausationIDFromContext returns the id set with WithCausationID, or "".
func CausationIDFromContext(ctx context.Context) string {
	s, _ := ctx.Value(causationKey{}).(string)
	return s
}

// WithTenant returns a copy of ctx carrying the tenant and its tier, written
// into every message staged under it (tailrace.MetaTenant,
// tailrace.MetaTenantTier). Either may be empty.
func WithTenant(ctx context.Context, tenant, tier string) context.Context {
	return context.WithValue(ctx, tenantKey{}, tenantInfo{tenant, tier})
}

// TenantFromContext returns the tenant and tier set with WithTenant.
func TenantFromContext(ctx context.Context) (tenant, tier string) {
	t, _ := ctx.Value(tenantKey{}).(tenantInfo)
	return t.tenant, t.tier
}
