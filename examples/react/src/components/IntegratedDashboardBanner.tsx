import { useStravaTokens } from '../useStravaTokens'
import { STATUS_TEXT, StatusPill } from './StatusPill'

const REAUTH_REASON: Record<string, string> = {
  refresh_token_invalid:
    'Strava no longer accepts the saved authorization (access may have been revoked on strava.com).',
  deauthorized: 'Access to this app was revoked on strava.com.',
}

function minutesUntil(epochSeconds: number): number {
  return Math.max(0, Math.round((epochSeconds * 1000 - Date.now()) / 60_000))
}

function clock(date: Date): string {
  return date.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit', second: '2-digit' })
}

/** The dashboard card: status, expiry, last refresh, and the connect/reconnect button with its reason. */
export function IntegratedDashboardBanner() {
  const { status, tokenStatus, needsReauth, loading, error, refreshed, message, checkedAt, reconnect, ensureFresh } =
    useStravaTokens()
  const expiresAt = tokenStatus?.expires_at ?? null
  const lastRefresh = tokenStatus?.last_refreshed_at ? new Date(tokenStatus.last_refreshed_at) : null
  return (
    <section className="card" data-testid="integrated-banner" data-status={status} aria-busy={loading}>
      <header className="card-head">
        <h2>Strava connection</h2>
        <StatusPill status={status} testId="integrated-status" />
      </header>
      <p className="lead">{STATUS_TEXT[status]}</p>

      {tokenStatus !== null && !needsReauth && (
        <dl className="facts">
          <dt>Athlete</dt>
          <dd data-testid="athlete-id">{tokenStatus.athlete_id === null ? '—' : `#${tokenStatus.athlete_id}`}</dd>
          <dt>Token expires</dt>
          <dd data-testid="expires-in">
            {expiresAt === null ? '—' : `in ${minutesUntil(expiresAt)} min (${clock(new Date(expiresAt * 1000))})`}
          </dd>
          <dt>Last refresh</dt>
          <dd data-testid="last-refresh">{lastRefresh ? clock(lastRefresh) : 'not yet'}</dd>
          <dt>This page load</dt>
          <dd data-testid="refresh-outcome">
            {refreshed ? 'refreshed at Strava' : (message ?? 'checked')}
            {checkedAt !== null && ` (${clock(new Date(checkedAt))})`}
          </dd>
          <dt>Scopes</dt>
          <dd>{tokenStatus.scopes.join(', ') || '—'}</dd>
        </dl>
      )}

      {status === 'not_connected' && (
        <div className="action">
          <p>Connect your Strava account so the dashboard can sync your activities.</p>
          <button type="button" className="primary" data-testid="connect-button" onClick={() => void reconnect()}>
            Connect with Strava
          </button>
        </div>
      )}

      {needsReauth && status !== 'not_connected' && (
        <div className="action action-bad">
          <p data-testid="reauth-reason">
            {REAUTH_REASON[tokenStatus?.reauth_reason ?? ''] ?? error ?? 'Strava needs you to sign in again.'}
          </p>
          <button type="button" className="primary" data-testid="reconnect-button" onClick={() => void reconnect()}>
            Reconnect Strava
          </button>
        </div>
      )}

      {(status === 'unavailable' || status === 'error') && (
        <div className="action action-warn">
          <p data-testid="banner-error">{error}</p>
          <button type="button" disabled={loading} onClick={() => void ensureFresh()}>
            Try again
          </button>
        </div>
      )}
    </section>
  )
}
