import { currentUserId } from './appBackend'
import { CompactDashboardBanner } from './components/CompactDashboardBanner'
import { IntegratedDashboardBanner } from './components/IntegratedDashboardBanner'
import { ManualSyncComponent } from './components/ManualSyncComponent'
import { useStravaTokens } from './useStravaTokens'

const RETURN_NOTICE: Record<string, string> = {
  connected: 'Strava is connected. Welcome back!',
  denied: 'You cancelled connecting Strava; you can try again any time.',
  failed: 'Connecting Strava did not complete; please connect again.',
  capacity: 'Strava did not connect: this app has reached its limit of connected athletes. Please try again later.',
}

/** How many times this page load asked tokensvc: the point of the hook is that mounting three components says 1. */
function CallCounter() {
  const { calls } = useStravaTokens()
  return <strong data-testid="tokensvc-calls">{calls}</strong>
}

/** The note tokensvc's `strava=` marker asks for, unless the connection has since gone bad (e.g. on a reload). */
function ReturnNotice() {
  const { status, needsReauth } = useStravaTokens()
  const returned = new URLSearchParams(window.location.search).get('strava')
  if (returned === null || RETURN_NOTICE[returned] === undefined) return null
  if (returned === 'connected' && (needsReauth || status === 'loading')) return null
  return (
    <p className={`notice notice-${returned}`} data-testid="return-notice">
      {RETURN_NOTICE[returned]}
    </p>
  )
}

export function App() {
  return (
    <div className="page">
      <header className="topbar">
        <div className="brand">
          <span className="logo" aria-hidden="true">
            ▲
          </span>
          <span>Training dashboard</span>
        </div>
        <CompactDashboardBanner />
        <div className="user" data-testid="app-user">
          Signed in as <strong>{currentUserId()}</strong>
        </div>
      </header>

      <main>
        <ReturnNotice />
        <div className="grid">
          <IntegratedDashboardBanner />
          <ManualSyncComponent />
        </div>

        <section className="explain">
          <h3>What happens on this page</h3>
          <ol>
            <li>
              Three components mount and all use <code>useStravaTokens()</code>; the hook calls tokensvc's{' '}
              <code>POST /proactive-token-refresh</code> once per page load. Calls on this page load: <CallCounter />{' '}
              (one on mount, plus one per <em>Sync now</em>).
            </li>
            <li>
              tokensvc knows the user from its HttpOnly session cookie and refreshes the Strava token if it is due. It
              answers with a status only: this page never sees a Strava token or the tokensvc API key.
            </li>
            <li>
              <em>Sync now</em> asks tokensvc once more, then the app's backend reads the athlete and their five newest
              activities through tokensvc's Strava gateway (<code>GET /v1/users/&#123;id&#125;/strava/…</code>, with its
              API key): tokensvc adds the token, so the backend never holds one either.
            </li>
          </ol>
        </section>
      </main>
    </div>
  )
}
