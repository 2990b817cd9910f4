package vault_test

import (
	"testing"

	"github.com/ferry-dr/ferry/internal/vault"
	"github.com/ferry-dr/ferry/internal/vault/sitetest"
)

// The fake site of the vault's tests keeps the contract the real agent
// keeps (internal/agent runs the same suite over agentclient).
func TestFakeSiteConformance(t *testing.T) {
	sitetest.Run(t, func(t *testing.T) vault.Site { return vault.NewFakeSite("east") })
}
