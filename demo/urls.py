from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path

urlpatterns = [
    path("admin/", admin.site.urls),
    path("login/", auth_views.LoginView.as_view(template_name="portal/login.html"),
         name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    # The app's ready views for job files (list, download, archive, upload).
    path("hpc/", include("djangoapp.urls")),
    path("", include("portal.urls")),
]
